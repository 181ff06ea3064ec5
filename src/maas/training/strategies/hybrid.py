"""``hybrid``: data parallel x pipeline on a 2-D device mesh of ``dp`` x ``pp`` ranks.

Global rank ``r`` sits at (``r // pp``, ``r % pp``): each row of the mesh is one whole pipeline (as in
``pipeline``, talking over its "pp" group), reading its own shard of the global batch; each column holds
the ``dp`` replicas of one stage, whose gradients are averaged over the "dp" group before every update, so
the replicas stay identical and the step equals one process's step on the whole global batch. Checkpoints
keep the model's own names, as ``pipeline`` does; DCP writes one copy of the replicated tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from maas.training.strategies.base import OptimizerFactory, WorkerContext
from maas.training.strategies.pipeline import PipelineStrategy


class HybridStrategy(PipelineStrategy):
    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        from torch.distributed.device_mesh import init_device_mesh

        # Collective: every rank builds the mesh's groups, in the same order.
        self._mesh = init_device_mesh(ctx.device.type, (config.dp, config.pp), mesh_dim_names=("dp", "pp"))
        self._dp_group = self._mesh.get_group("dp")

    def data_parallel(self) -> tuple[int, int]:
        return self._mesh.get_local_rank("dp"), self.config.dp

    def _pipeline(self) -> tuple[dist.ProcessGroup | None, int, int]:
        return self._mesh.get_group("pp"), self._mesh.get_local_rank("pp"), self.config.pp

    def build(self, model_factory: Callable[[], nn.Module], optimizer_factory: OptimizerFactory) -> None:
        super().build(model_factory, optimizer_factory)
        assert self.optimizer is not None
        # Before every update, whichever path ran the backward pass (the schedule, or one stage's plain step).
        self.optimizer.register_step_pre_hook(lambda *_: self._average_gradients())

    def _average_gradients(self) -> None:
        """Every replica of this stage gets the mean of their gradients (one all-reduce of them all, flattened)."""
        assert self.model is not None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads or self.config.dp == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._dp_group)
        flat /= self.config.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean_over_trainers(self, value: torch.Tensor) -> float:
        # Each pipeline's ranks already hold its whole loss; the mean over the pipelines is the global batch's.
        value = value.clone()
        dist.all_reduce(value, group=self._dp_group)
        return float(value / self.config.dp)

    def full_model(self) -> nn.Module | None:
        """Collective over the first pipeline, whose stages gather to its stage 0, global rank 0."""
        if self._mesh.get_local_rank("dp") != 0:
            return None
        return super().full_model()
