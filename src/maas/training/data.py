"""Data for the loop: datasets from factories, sharded (or replicated) across data-parallel ranks, with the
same global order for every world size, so a run on N ranks sees the batches one rank would."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from maas.errors import InvalidInput


def gather(dataset: Dataset[Any], idx: torch.Tensor) -> Any:
    """The samples at ``idx`` as one batch."""
    if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor instead of per-sample collation
        return tuple(t[idx] for t in dataset.tensors)
    return default_collate([dataset[int(i)] for i in idx])


class ShardedBatches:
    """Per-rank micro-batches of one epoch.

    The epoch's permutation is drawn from ``seed + epoch`` over the whole dataset; global batch ``s``
    is ``perm[s*B:(s+1)*B]`` and data-parallel rank ``r`` takes every ``dp``-th sample of it, so the union
    over ranks is exactly the single-process batch. ``replicate`` gives every rank the whole global batch
    order of its own (seeded by rank).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        global_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        replicate: bool = False,
    ) -> None:
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.replicate = replicate
        self.steps_per_epoch = self.n // global_batch
        if self.steps_per_epoch == 0:
            raise InvalidInput(f"the training set has {self.n} samples, fewer than one batch of {global_batch}")

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Any]]:
        """Yield, for each step of ``epoch`` from ``start_step``, this rank's ``grad_accum`` micro-batches."""
        seed = self.seed + epoch + (1_000_003 * self.dp_rank if self.replicate else 0)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        B = self.global_batch
        for step in range(start_step, self.steps_per_epoch):
            batch = perm[step * B : (step + 1) * B]
            mine = batch if self.replicate else batch[self.dp_rank :: self.dp_size]
            if self.replicate:
                mine = mine[: B // self.dp_size]
            yield [gather(self.dataset, chunk) for chunk in mine.chunk(self.grad_accum)]


def fingerprint(dataset: Dataset[Any], max_items: int = 4096) -> str:
    """A sha256 over the dataset's length and up to ``max_items`` evenly spaced samples."""
    if hasattr(dataset, "fingerprint"):
        return str(dataset.fingerprint())
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"n={n}".encode())
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            h.update(t.contiguous().numpy().tobytes() if t.numel() * t.element_size() < 1 << 28 else b"")
        return "sha256:" + h.hexdigest()
    step = max(1, n // max_items)
    for i in range(0, n, step):
        for part in dataset[i] if isinstance(dataset[i], tuple | list) else (dataset[i],):
            if isinstance(part, torch.Tensor):
                h.update(part.contiguous().numpy().tobytes())
            else:
                h.update(repr(part).encode())
    return "sha256:" + h.hexdigest()
