"""The shared training loop in this process (no launcher): mixed precision and evaluation during training."""

from pathlib import Path

import torch

from maas.training.config import parse_config
from maas.training.loop import train_loop
from maas.training.strategies import WorkerContext

seen_dtypes: list[torch.dtype] = []


def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy that records the dtype of the model's outputs (bf16 under autocast)."""
    seen_dtypes.append(outputs.dtype)
    return torch.nn.functional.cross_entropy(outputs.float(), targets)


class MemoryRegistry:
    """What the loop's reporter writes, kept in memory."""

    def __init__(self) -> None:
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.runs = self  # the loop writes through registry.runs

    def log_run_steps(self, run_id: str, steps: list[object]) -> None:
        pass

    def add_run_checkpoint(self, run_id: str, step: int, path: str) -> None:
        pass

    def log_run_eval(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.evals.append((step, metrics))


def test_bf16_autocast_trains_digits_and_evaluates_during_training(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": 64}},
            "data": {"train": "maas.demo.digits:train_dataset", "eval": "maas.demo.digits:test_dataset"},
            "loss": "tests.unit.test_loop:recording_loss",
            "optimizer": {"name": "adamw", "lr": 0.003},
            "steps": 150,
            "batch_size": 64,
            "precision": "bf16",
            "eval": {"metric": "accuracy", "every_steps": 50},
        }
    )
    registry = MemoryRegistry()
    seen_dtypes.clear()
    result = train_loop(cfg, WorkerContext(0, 1, 0, torch.device("cpu"), "r" * 32, tmp_path), registry)
    assert set(seen_dtypes) == {torch.bfloat16} and len(seen_dtypes) == 150  # every step ran under autocast
    assert result.model is not None and all(p.dtype == torch.float32 for p in result.model.parameters())
    assert [step for step, _ in registry.evals] == [50, 100, 150]
    assert registry.evals[-1][1] == {"accuracy": result.eval_metrics["accuracy"]}
    assert result.eval_metrics["accuracy"] >= 0.9
