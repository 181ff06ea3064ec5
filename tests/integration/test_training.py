"""Training through the real launcher: torchrun's elastic agent, gloo processes, DCP checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maas.demo.digits import mlp
from maas.registry import Registry
from tests.integration.training_support import (
    assert_same_params,
    final_params,
    finished,
    kill_a_worker_after_checkpoint,
    only_run,
    start,
    train,
)

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


def test_ddp_on_two_processes_equals_single(tmp_path: Path) -> None:
    a, b = tmp_path / "single", tmp_path / "ddp"
    single_run = train(a, config("single"))
    ddp_run = train(b, config("ddp", grad_accum=2), "--nproc-per-node", "2")
    single, ddp = final_params(a, single_run.id), final_params(b, ddp_run.id)
    assert_same_params(ddp, single, atol=1e-5)
    assert not torch.equal(single["0.weight"], mlp(32).state_dict()["0.weight"])  # it did train
    assert ddp_run.world_size == 2 and ddp_run.last_step == 50


@pytest.mark.parametrize("restarts", [1, 0])
def test_sigkilled_worker_resumes_to_the_same_parameters(tmp_path: Path, restarts: int) -> None:
    cfg = config("ddp", steps=300, checkpoint={"every_steps": 60, "keep": 2}, log_every=10)
    reference = tmp_path / "reference"
    want = final_params(reference, train(reference, cfg, "--nproc-per-node", "2").id)

    home = tmp_path / f"killed-{restarts}"
    proc = start(home, cfg, "--nproc-per-node", "2", "--max-restarts", str(restarts))
    kill_a_worker_after_checkpoint(home, proc)
    out, _ = proc.communicate(timeout=240)
    run_id = only_run(home).id
    if restarts:
        assert proc.returncode == 0, out  # the elastic agent restarted the workers, which resumed
    else:
        assert proc.returncode == 1 and "--resume" in out, out
        assert Registry(home=home).runs.get_run(run_id).status == "failed"
        finished(start(home, None, "--resume", run_id[:8], "--nproc-per-node", "2"))
    assert_same_params(final_params(home, run_id), want, atol=0)
    run = Registry(home=home).runs.get_run(run_id)
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
        eval={"metric": "accuracy", "every_steps": 50},
    )
    out = finished(start(home, cfg, "--nproc-per-node", "2"))
    reg = Registry(home=home)
    run = only_run(home)
    mv = reg.resolve("models:/digits@production")
    assert run.model_uri == mv.uri and mv.uri in out
    assert mv.lineage.source_run == run.id
    assert mv.lineage.extra["config_hash"] == run.config_hash
    assert mv.lineage.extra["dataset_fingerprint"].startswith("sha256:")
    assert mv.metrics["accuracy"] == run.eval_metrics["accuracy"] >= 0.9
    evals = reg.runs.run_evals(run.id)  # during training every 50 steps, and at the end
    assert [e.step for e in evals] == [50, 100, 150, 200]
    assert evals[-1].metrics == {"accuracy": run.eval_metrics["accuracy"]}
    assert evals[0].metrics["accuracy"] < evals[-1].metrics["accuracy"]
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
    assert [e["step"] for e in shown["evals"]] == [50, 100, 150, 200]


@pytest.mark.timeout(900)
def test_two_nodes_train_one_run_and_resume_together_after_a_kill(tmp_path: Path) -> None:
    """Two `maas train` agents (two "machines", one process each) joined by a c10d rendezvous on loopback, set
    up as the README says: a MAAS_HOME (registry) each, one shared MAAS_RUNS_DIR. One job: the same run id in
    both registries and one run folder. A worker SIGKILLed on one node: both agents restart their workers,
    which resume from the same checkpoint and end with exactly the parameters of two processes on one node
    that never stopped."""
    from maas.testing.server import free_port

    one_thread = {"OMP_NUM_THREADS": "1"}  # everywhere: the sums run in one order
    cfg = config("ddp", steps=300, checkpoint={"every_steps": 60, "keep": 2}, log_every=10)
    one_node = tmp_path / "one-node"
    want = final_params(one_node, train(one_node, cfg, "--nproc-per-node", "2", env=one_thread).id)

    homes, runs = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "shared-runs"
    env = {**one_thread, "MAAS_RUNS_DIR": str(runs)}
    endpoint = f"127.0.0.1:{free_port()}"
    args = ("--nnodes", "2", "--rdzv-endpoint", endpoint, "--max-restarts", "1")
    nodes = [start(home, cfg, *args, env=env) for home in homes]
    kill_a_worker_after_checkpoint(homes[1], nodes[1], runs)
    outputs = [finished(node, timeout=400) for node in nodes]
    assert "terminated with signal SIGKILL" in outputs[1], outputs[1]
    records = [only_run(home) for home in homes]
    run = next(r for r in records if r.eval_metrics.get("accuracy") is not None)  # the reporting node's copy
    assert {r.id for r in records} == {run.id} and all(run.id in out for out in outputs)
    assert all(r.status == "succeeded" and r.world_size == 2 for r in records)
    assert run.last_step == 300 and run.eval_metrics["accuracy"] > 0.9
    assert_same_params(final_params(homes[0], run.id, runs=runs), want, atol=0)
    folder = runs / run.id / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000240", "step-00000300"]  # none left partial
    assert not (homes[0] / "runs").exists() and not (homes[1] / "runs").exists()

    # The same job again at the same rendezvous is refused with the fix; a new --rdzv-id starts a new run.
    again = start(homes[0], cfg, "--nnodes", "2", "--rdzv-endpoint", endpoint, env=env)
    out, _ = again.communicate(timeout=60)
    assert again.returncode != 0 and "already succeeded" in out and "--rdzv-id" in out, out
