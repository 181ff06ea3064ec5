"""What a parallel strategy provides to the shared training loop."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class WorkerContext:
    """One worker process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    run_id: str
    run_dir: Path

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


class Strategy(ABC):
    """Wraps the model for one way of parallelising; the loop does the rest.

    A strategy says which data-parallel shard this rank reads, wraps the model (e.g. in DDP), and
    tells the loop when gradient synchronisation may be skipped (accumulation micro-steps).
    """

    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        self.config = config
        self.ctx = ctx

    @abstractmethod
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, number of data-parallel ranks)."""

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on."""

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module) -> Iterator[None]:
        """Skip gradient synchronisation for an accumulation micro-step (a no-op unless overridden)."""
        yield

    @property
    def reports(self) -> bool:
        """Whether this rank logs metrics, evaluates, checkpoints metadata and publishes."""
        return self.ctx.rank == 0
