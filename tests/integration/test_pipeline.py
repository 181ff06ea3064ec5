"""Pipeline parallelism through the real launcher: two gloo processes, one stage each, checked against one process."""

from pathlib import Path
from typing import Any

import pytest
import torch

from maas.demo.digits import mlp
from maas.registry import Registry
from maas.registry.entities import Run
from tests.integration import training_support
from tests.integration.training_support import final_params

pytestmark = pytest.mark.slow

HIDDEN, DEPTH = 32, 2  # layers "0".."4": Linear, ReLU, Linear, ReLU, Linear


def train(home: Path, cfg: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> Run:
    # One thread per process, the single-process reference included, so that every run sums in one order.
    return training_support.train(home, cfg, *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


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
        # Evaluated after step 2 as well: gathering the stages mid-run must not disturb training.
        "eval": {"metric": "tests.integration.training_support:logit_energy", "every_steps": 2},
        "log_every": 2,
        "strategy": strategy,
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, torch.Tensor]]:
    home = tmp_path_factory.mktemp("single") / "home"
    # Evaluated only at the end: the runs compared with it evaluate mid-run as well, which must change nothing.
    run = train(home, config({"name": "single"}, eval={"metric": "tests.integration.training_support:logit_energy"}))
    return run, final_params(home, run.id, HIDDEN, DEPTH)


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
    got = final_params(home, run.id, HIDDEN, DEPTH)
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
    assert [e.step for e in Registry(home=home).runs.run_evals(run.id)] == [2, 4]


def test_killed_stage_resumes_to_the_same_parameters(tmp_path: Path) -> None:
    strategy = {"name": "pipeline", "schedule": "1f1b", "microbatches": 4}
    cfg = config(
        strategy,
        loss="tests.integration.training_support:crash_once",
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},  # optimizer state the checkpoint must carry
        checkpoint={"every_steps": 2, "keep": 2},
    )
    marker = tmp_path / "crashed"
    env = {"MAAS_TEST_CRASH_MARKER": str(marker)}
    reference = tmp_path / "reference"
    marker.touch()  # the reference never crashes
    want = final_params(reference, train(reference, cfg, "--nproc-per-node", "2", env=env).id, HIDDEN, DEPTH)

    marker.unlink()
    home = tmp_path / "crashed-home"
    run = train(home, cfg, "--nproc-per-node", "2", "--max-restarts", "1", env=env)
    assert marker.exists()  # the last stage died after the step-2 checkpoint; the agent restarted both ranks
    got = final_params(home, run.id, HIDDEN, DEPTH)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
    assert run.last_step == 4


def test_batch_that_does_not_split_into_microbatches_is_refused(tmp_path: Path) -> None:
    proc = training_support.start(tmp_path / "home", config({"name": "pipeline", "microbatches": 5}, steps=1))
    out, _ = proc.communicate(timeout=training_support.TIMEOUT)
    assert proc.returncode != 0
    assert "does not split into strategy.microbatches 5" in out
