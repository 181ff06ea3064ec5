"""Training through the real launcher: torchrun's elastic agent, gloo processes, DCP checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from maas.demo.digits import mlp
from maas.registry import Registry
from maas.training import checkpoint

pytestmark = pytest.mark.slow


def config(strategy: str, **over: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": 32}},
        "data": {"train": "maas.demo.digits:train_dataset", "eval": "maas.demo.digits:test_dataset"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001},
        "regularization": {"l2": 0.0001},
        "steps": 50,
        "batch_size": 64,
        "seed": 3,
        "deterministic": True,
        "eval": {"metric": "accuracy"},
        "strategy": {"name": strategy},
    }
    cfg.update(over)
    return cfg


def run_cli(home: Path, tmp: Path, cfg: dict[str, object], *args: str, **popen: object) -> subprocess.Popen[str]:
    path = tmp / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MAAS_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "maas", "train", str(path), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def final_params(home: Path, run_id: str, hidden: int = 32) -> dict[str, torch.Tensor]:
    found = checkpoint.latest(home / "runs" / run_id)
    assert found is not None
    model = mlp(hidden)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "loop": {"step": torch.tensor(0)}}
    checkpoint.load(found[1], {"model": state["model"], "loop": state["loop"]})
    return {k: v.clone() for k, v in state["model"].items()}


def finished(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def only_run(home: Path) -> str:
    runs = Registry(home=home).list_runs()
    return runs[0].id


def test_ddp_on_two_processes_equals_single(tmp_path: Path) -> None:
    a, b = tmp_path / "single", tmp_path / "ddp"
    finished(run_cli(a, tmp_path, config("single")))
    finished(run_cli(b, tmp_path, config("ddp", grad_accum=2), "--nproc-per-node", "2"))
    single, ddp = final_params(a, only_run(a)), final_params(b, only_run(b))
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=0)
    assert not torch.equal(single["0.weight"], mlp(32).state_dict()["0.weight"])  # it did train
    runs = {r.strategy: r for r in Registry(home=b).list_runs() + Registry(home=a).list_runs()}
    assert runs["ddp"].world_size == 2 and runs["ddp"].status == "succeeded" and runs["ddp"].last_step == 50


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _kill_a_worker_after_checkpoint(home: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs_dir = home / "runs"
        if runs_dir.exists() and any(checkpoint.latest(d) for d in runs_dir.iterdir()):
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    # Workers are the agent's multiprocessing-spawned children (their command line runs spawn_main).
    targets = [
        p
        for c in _children(proc.pid)
        for p in [c, *_children(c)]
        if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]
    assert targets, "no worker process found"
    os.kill(targets[-1], signal.SIGKILL)


@pytest.mark.parametrize("restarts", [1, 0])
def test_sigkilled_worker_resumes_to_the_same_parameters(tmp_path: Path, restarts: int) -> None:
    cfg = config("ddp", steps=300, checkpoint={"every_steps": 60, "keep": 2}, log_every=10)
    reference = tmp_path / "reference"
    finished(run_cli(reference, tmp_path, cfg, "--nproc-per-node", "2"))
    want = final_params(reference, only_run(reference))

    home = tmp_path / f"killed-{restarts}"
    proc = run_cli(home, tmp_path, cfg, "--nproc-per-node", "2", "--max-restarts", str(restarts))
    _kill_a_worker_after_checkpoint(home, proc)
    out, _ = proc.communicate(timeout=240)
    run_id = only_run(home)
    if restarts:
        assert proc.returncode == 0, out  # the elastic agent restarted the workers, which resumed
    else:
        assert proc.returncode == 1 and "--resume" in out, out
        assert Registry(home=home).get_run(run_id).status == "failed"
        resumed = subprocess.run(
            [sys.executable, "-m", "maas", "train", "--resume", run_id[:8], "--nproc-per-node", "2"],
            env={**os.environ, "MAAS_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    got = final_params(home, run_id)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    run = Registry(home=home).get_run(run_id)
    assert run.status == "succeeded" and run.last_step == 300


def test_published_run_is_served_with_its_recorded_accuracy(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.http as httpclient

    from maas.demo.digits import load_digits_split
    from maas.testing.server import RemoteServer

    home = tmp_path / "home"
    cfg = config(
        "ddp",
        steps=200,
        optimizer={"name": "adamw", "lr": 0.003},
        publish={"name": "digits", "alias": "production", "head": "classifier", "input_names": ["pixels"]},
    )
    out = finished(run_cli(home, tmp_path, cfg, "--nproc-per-node", "2"))
    reg = Registry(home=home)
    run = reg.list_runs()[0]
    mv = reg.resolve("models:/digits@production")
    assert run.model_uri == mv.uri and mv.uri in out
    assert mv.lineage.source_run == run.id
    assert mv.lineage.extra["config_hash"] == run.config_hash
    assert mv.lineage.extra["dataset_fingerprint"].startswith("sha256:")
    assert mv.metrics["accuracy"] == run.eval_metrics["accuracy"] >= 0.9
    data = load_digits_split()
    with RemoteServer(home) as server:
        client = httpclient.InferenceServerClient(server.address)
        inp = httpclient.InferInput("pixels", list(data.x_test.shape), "FP32")
        inp.set_data_from_numpy(data.x_test)
        labels = client.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("label")]).as_numpy("label")
    served = float(np.mean(labels == data.y_test))
    assert abs(served - run.eval_metrics["accuracy"]) <= 1 / len(data.y_test)
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "maas", "runs", "show", run.id, "--json"],
            env={**os.environ, "MAAS_HOME": str(home)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert shown["model_uri"] == mv.uri and len(shown["checkpoints"]) >= 1
