"""Training configs: every mistake caught before a process starts, with the fix named."""

import os
import re
from pathlib import Path

import pytest

from maas.errors import InvalidInput
from maas.training.config import load_config, parse_config
from maas.training.launch import check

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"factory": "maas.demo.digits:mlp"},
    "data": {"train": "maas.demo.digits:train_dataset"},
    "batch_size": 64,
    "steps": 10,
}


def with_(**over: object) -> dict[str, object]:
    return {**BASE, **over}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (with_(optimiser={"name": "adam"}), ["unknown key 'optimiser'", "optimizer"]),
        (with_(optimizer={"name": "adam", "lrate": 1}), ["unknown key 'optimizer.lrate'", "lr"]),
        (with_(optimizer={"name": "lamb"}), ["optimizer.name", "'sgd', 'adam', 'adamw' or 'rmsprop'"]),
        (with_(strategy={"name": "allreduce"}), ["strategy", "'single', 'ddp'"]),
        (with_(model={"factory": "maas.demo.digits.mlp"}), ["model.factory", "package.module:function"]),
        (with_(steps=None), ["exactly one of steps or epochs"]),
        (with_(epochs=2), ["exactly one of steps or epochs"]),
        (with_(batch_size=64, grad_accum=3), ["not divisible by grad_accum 3"]),
        (with_(optimizer={"lr": -1}), ["optimizer.lr", "greater than 0"]),
        (with_(publish={"name": "../x"}), ["publish.name", "invalid model name"]),
        (with_(precision="fp8"), ["precision", "'fp32' or 'bf16'"]),
        (with_(eval={"every_steps": 0}), ["eval.every_steps", "greater than 0"]),
        (with_(eval={"every": 10}), ["unknown key 'eval.every'", "every_steps"]),
        (with_(eval={"every_steps": 10}), ["eval.every_steps evaluates on data.eval", "give data.eval"]),
        (
            with_(batch_size=24, strategy={"name": "hybrid", "dp": 2, "pp": 2, "microbatches": 8}),
            ["over strategy.dp 2 pipelines into strategy.microbatches 8", "multiple of dp x microbatches = 16"],
        ),
        ([1, 2], ["mapping"]),
    ],
)
def test_bad_configs_name_the_problem(data: object, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_config(data)
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("data", "world", "words"),
    [
        (with_(model={"factory": "maas.nothing_here:mlp"}), 1, ["model.factory", "cannot import module"]),
        (with_(model={"factory": "maas.demo.digits:nope"}), 1, ["has no attribute 'nope'"]),
        (with_(data={"train": "maas.demo.digits:MODEL_NAME_X"}), 1, ["data.train"]),
        (with_(loss="maas.demo.digits:missing"), 1, ["loss"]),
        (with_(), 2, ["strategy single runs on one process"]),
        (with_(strategy={"name": "ddp"}, batch_size=63), 2, ["multiple of 2"]),
        (
            with_(strategy={"name": "hybrid", "dp": 2, "pp": 2}),
            2,
            ["dp 2 x pp 2 needs 4 processes", "--nproc-per-node"],
        ),
        (with_(strategy={"name": "hybrid", "dp": 2, "pp": 2, "split_points": ["2", "4"]}), 4, ["give pp - 1 = 1"]),
    ],
)
def test_checks_before_launch(data: dict[str, object], world: int, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as info:
        check(parse_config(data), world)
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    """Each example names its command in a comment; it must pass every check for that process count."""
    cfg = load_config(path)
    match = re.search(r"--nproc-per-node (\d+)", path.read_text())
    check(cfg, int(match.group(1)) if match else 1)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"rdzv_id": "job-1"}, ["--rdzv-id names a new job on several nodes", "--nnodes > 1"]),
        ({"nnodes": 2}, ["needs --rdzv-endpoint HOST:PORT"]),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, ["--node-rank 2 is outside 0..1"]),
        ({"nproc_per_node": 0}, ["at least 1"]),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_conf": "is_host"}, ["--rdzv-conf 'is_host'", "is_host=1"]),
    ],
)
def test_bad_launch_arguments_are_refused_before_a_run_is_recorded(
    tmp_path: Path, args: dict[str, object], words: list[str]
) -> None:
    from maas.registry import Registry
    from maas.training.launch import train

    registry = Registry(home=tmp_path)
    with pytest.raises(InvalidInput) as info:
        train(with_(), registry=registry, **args)  # type: ignore[arg-type]
    for w in words:
        assert w in str(info.value), str(info.value)
    assert registry.runs.list_runs() == []


def test_yaml_errors_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_worker_threads_are_set_only_while_the_workers_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # A ddp run used to leave OMP_NUM_THREADS=1 in the caller's environment: every later single-process run
    # from the same process then trained on one thread (half the speed on 2 cores).
    from maas.training.launch import _threads_per_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with _threads_per_worker(2):
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "OMP_NUM_THREADS" not in os.environ
    with _threads_per_worker(1):
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice wins, and stays
    with _threads_per_worker(2):
        assert os.environ["OMP_NUM_THREADS"] == "3"
    assert os.environ["OMP_NUM_THREADS"] == "3"
