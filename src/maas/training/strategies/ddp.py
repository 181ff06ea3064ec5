"""``ddp``: DistributedDataParallel over every rank (gloo on CPU, NCCL on GPU), data sharded by rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maas.training.strategies.base import Strategy


class DDPStrategy(Strategy):
    def data_parallel(self) -> tuple[int, int]:
        return self.ctx.rank, self.ctx.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.ctx.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.ctx.device.index])
        return DistributedDataParallel(model)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with cast(DistributedDataParallel, self.wrapped).no_sync():
            yield
