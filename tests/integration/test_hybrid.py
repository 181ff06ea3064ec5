"""Hybrid parallelism through the real launcher: four gloo processes as 2 pipelines x 2 stages, checked against
one process, trained to accuracy, and resumed after a stage dies."""

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


def hybrid(**over: object) -> dict[str, object]:
    return {"name": "hybrid", "dp": 2, "pp": 2, "microbatches": 4, **over}


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
def test_hybrid_2x2_equals_single(
    tmp_path: Path,
    single: tuple[Run, dict[str, torch.Tensor]],
    schedule: str,
    split_points: list[str] | None,
    grad_accum: int,
) -> None:
    want_run, want = single
    home = tmp_path / "hybrid"
    strategy = hybrid(schedule=schedule, split_points=split_points)
    run = train(home, config(strategy, grad_accum=grad_accum), "--nproc-per-node", "4")
    got = final_params(home, run.id, HIDDEN, DEPTH)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    assert not torch.equal(want["4.weight"], mlp(HIDDEN, DEPTH).state_dict()["4.weight"])  # it did train
    # The logged loss is the mean over the pipelines of each one's whole-model loss, i.e. the global batch's;
    # rank 0 evaluated the whole model gathered from the first pipeline's stages.
    assert run.world_size == 4 and run.last_step == 4
    assert run.eval_metrics is not None and want_run.eval_metrics is not None
    assert run.eval_metrics["final_loss"] == pytest.approx(want_run.eval_metrics["final_loss"], abs=1e-5)
    assert run.eval_metrics["logit_energy"] == pytest.approx(want_run.eval_metrics["logit_energy"], rel=1e-5)
    assert [e.step for e in Registry(home=home).runs.run_evals(run.id)] == [2, 4]


def test_hybrid_2x2_trains_digits_to_accuracy(tmp_path: Path) -> None:
    cfg = config(
        hybrid(schedule="1f1b"),
        model={"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": 64, "depth": DEPTH}},
        optimizer={"name": "adamw", "lr": 0.003},
        regularization={},
        steps=150,
        seed=0,
        eval={"metric": "accuracy"},
        log_every=10,
    )
    home = tmp_path / "home"
    run = train(home, cfg, "--nproc-per-node", "4")
    assert run.world_size == 4 and run.last_step == 150
    assert run.eval_metrics["accuracy"] >= 0.9
    # The checkpoint holds the whole model under its own names, one copy of each replicated stage.
    assert set(final_params(home, run.id, hidden=64, depth=DEPTH)) == set(mlp(64, DEPTH).state_dict())


def test_killed_stage_resumes_to_the_same_parameters(tmp_path: Path) -> None:
    cfg = config(
        hybrid(schedule="1f1b"),
        loss="tests.integration.training_support:crash_once",
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},  # optimizer state the checkpoint must carry
        checkpoint={"every_steps": 2, "keep": 2},
    )
    marker = tmp_path / "crashed"
    env = {"MAAS_TEST_CRASH_MARKER": str(marker)}
    reference = tmp_path / "reference"
    marker.touch()  # the reference never crashes
    want = final_params(reference, train(reference, cfg, "--nproc-per-node", "4", env=env).id, HIDDEN, DEPTH)

    marker.unlink()
    home = tmp_path / "crashed-home"
    run = train(home, cfg, "--nproc-per-node", "4", "--max-restarts", "1", env=env)
    assert marker.exists()  # a last stage died after the step-2 checkpoint; the agent restarted every rank
    got = final_params(home, run.id, HIDDEN, DEPTH)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
    assert run.last_step == 4
