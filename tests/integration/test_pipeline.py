"""Pipeline parallelism through the real launcher: two gloo processes, one stage each, checked against one process."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict

from maas.demo.digits import mlp
from maas.registry import Registry
from maas.registry.entities import Run
from maas.training import checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, DEPTH = 32, 2  # layers "0".."4": Linear, ReLU, Linear, ReLU, Linear


def config(strategy: dict[str, object], **over: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": HIDDEN, "depth": DEPTH}},
        "data": {"train": "maas.demo.digits:train_dataset", "eval": "maas.demo.digits:test_dataset"},
        "optimizer": {"name": "sgd", "lr": 0.2},
        "regularization": {"l2": 0.001},
        "steps": 4,
        "batch_size": 64,
        "seed": 3,
        "deterministic": True,
        "eval": {"metric": "tests.integration.test_pipeline:logit_energy"},
        "log_every": 2,
        "strategy": strategy,
    }
    cfg.update(over)
    return cfg


def train(home: Path, cfg: dict[str, object], *args: str, env: dict[str, str] | None = None) -> Run:
    path = home.with_name(f"{home.name}-{time.monotonic_ns()}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    # One thread per process, as torchrun sets it: two processes on two cores otherwise spin against each other.
    env = {**os.environ, "MAAS_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "maas", "train", str(path), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = Registry(home=home).list_runs()
    assert len(runs) == 1 and runs[0].status == "succeeded", runs
    return runs[0]


def logit_energy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """An eval metric that every parameter of the evaluated model moves."""
    return float(outputs.double().pow(2).mean())


def final_params(home: Path, run: Run) -> dict[str, torch.Tensor]:
    """The last checkpoint's model, read into one whole model (DCP merges the stages' keys)."""
    found = checkpoint.latest(home / "runs" / run.id)
    assert found is not None
    model = mlp(HIDDEN, DEPTH)
    model_sd, _ = get_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoint.load(found[1], {"model": model_sd, "loop": {"step": torch.tensor(0)}})
    return {k: v.clone() for k, v in model_sd.items()}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, torch.Tensor]]:
    home = tmp_path_factory.mktemp("single") / "home"
    run = train(home, config({"name": "single"}))
    return run, final_params(home, run)


@pytest.mark.parametrize(
    ("schedule", "split_points", "grad_accum"),
    [("gpipe", ["4"], 1), ("1f1b", None, 2)],  # None: balanced by parameters, which cuts at "2"
)
def test_pipeline_on_two_processes_equals_single(
    tmp_path: Path,
    single: tuple[Run, dict[str, torch.Tensor]],
    schedule: str,
    split_points: list[str] | None,
    grad_accum: int,
) -> None:
    strategy = {"name": "pipeline", "schedule": schedule, "split_points": split_points, "microbatches": 4}
    home = tmp_path / "home"
    run = train(home, config(strategy, grad_accum=grad_accum), "--nproc-per-node", "2")
    want_run, want = single
    got = final_params(home, run)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    assert not torch.equal(want["4.weight"], mlp(HIDDEN, DEPTH).state_dict()["4.weight"])  # it did train
    # The loss every rank reports is the whole model's (data loss from the last stage, penalties from all),
    # and rank 0 evaluated the whole model gathered from the stages.
    assert run.world_size == 2 and run.last_step == 4
    assert run.eval_metrics is not None and want_run.eval_metrics is not None
    assert run.eval_metrics["final_loss"] == pytest.approx(want_run.eval_metrics["final_loss"], abs=1e-5)
    assert run.eval_metrics["logit_energy"] == pytest.approx(want_run.eval_metrics["logit_energy"], rel=1e-5)


_calls = 0


def crash_once(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cross_entropy that kills its process at the 13th call (step 3 of 4 micro-batches per step), once."""
    global _calls
    _calls += 1
    marker = Path(os.environ["MAAS_TEST_CRASH_MARKER"])
    if _calls == 13 and not marker.exists():
        marker.touch()
        os._exit(1)
    return torch.nn.functional.cross_entropy(output, target)


def test_killed_stage_resumes_to_the_same_parameters(tmp_path: Path) -> None:
    strategy = {"name": "pipeline", "schedule": "1f1b", "microbatches": 4}
    cfg = config(
        strategy,
        loss="tests.integration.test_pipeline:crash_once",
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},  # optimizer state the checkpoint must carry
        checkpoint={"every_steps": 2, "keep": 2},
    )
    marker = tmp_path / "crashed"
    env = {"MAAS_TEST_CRASH_MARKER": str(marker)}
    reference = tmp_path / "reference"
    marker.touch()  # the reference never crashes
    want = final_params(reference, train(reference, cfg, "--nproc-per-node", "2", env=env))

    marker.unlink()
    home = tmp_path / "crashed-home"
    run = train(home, cfg, "--nproc-per-node", "2", "--max-restarts", "1", env=env)
    assert marker.exists()  # the last stage died after the step-2 checkpoint; the agent restarted both ranks
    got = final_params(home, run)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
    assert run.last_step == 4


def test_batch_that_does_not_split_into_microbatches_is_refused(tmp_path: Path) -> None:
    cfg = config({"name": "pipeline", "microbatches": 5}, steps=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "maas", "train", str(path), "--nproc-per-node", "2"],
        env={**os.environ, "MAAS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "does not split into strategy.microbatches 5" in proc.stdout + proc.stderr
