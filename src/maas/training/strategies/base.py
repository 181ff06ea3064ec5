"""What a parallel strategy provides to the shared training loop.

The loop owns everything that is the same for every strategy: data order, steps, learning rate,
logging, checkpoints, evaluation and publishing. A strategy owns how the model is held and how one
optimizer step happens: which data shard a rank reads, how the model is built and wrapped, the step
itself (forward, backward, gradient exchange, update), the state a checkpoint holds, and the full model
rank 0 evaluates and publishes. ``single`` and ``ddp`` use the defaults here; a parameter server or a
pipeline overrides the step and the model's placement.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PenaltyFn = Callable[[nn.Module], torch.Tensor | None]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


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
    """One way of parallelising, applied around the shared loop (see the module docstring)."""

    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        self.config = config
        self.ctx = ctx
        self.model: nn.Module | None = None  # this rank's (unwrapped) part of the model
        self.wrapped: nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None

    # --- placement -----------------------------------------------------------------------------

    @abstractmethod
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, number of data-parallel ranks)."""

    @property
    def is_trainer(self) -> bool:
        """Whether this rank runs the loop; a parameter server's server ranks do not (see :meth:`serve`)."""
        return True

    @property
    def reports(self) -> bool:
        """Whether this rank logs metrics, evaluates and publishes."""
        return self.ctx.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The ranks the loop's collectives (checkpoints) run over: None for all of them."""
        return None

    def build(self, model_factory: Callable[[], nn.Module], optimizer_factory: OptimizerFactory) -> None:
        """Create this rank's model, its wrapper and its optimizer."""
        self.model = model_factory().to(self.ctx.device)
        self.wrapped = self.wrap(self.model)
        self.optimizer = optimizer_factory(self.model.parameters())

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient synchronisation for an accumulation micro-step (a no-op unless overridden)."""
        yield

    # --- the step ------------------------------------------------------------------------------

    def train_step(
        self,
        micro_batches: list[Any],
        loss_fn: LossFn,
        penalty: PenaltyFn,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their mean loss (detached)."""
        assert self.model is not None and self.wrapped is not None and self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total: torch.Tensor | None = None
        for i, (x, y) in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.no_sync()
            with sync, autocast():
                loss = loss_fn(self.wrapped(x.to(self.ctx.device)), y.to(self.ctx.device))
                extra = penalty(self.model)
                if extra is not None:
                    loss = loss + extra
                # Without accumulation the loss is used as is: every tensor op costs microseconds per step.
                (loss if n == 1 else loss / n).backward()
            part = loss.detach().float()
            total = part if n == 1 else (part / n if total is None else total + part / n)
        self.optimizer.step()
        assert total is not None
        return total

    def mean_over_trainers(self, value: torch.Tensor) -> float:
        """The mean of ``value`` over the ranks that run the loop (for logging)."""
        if self.ctx.is_distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ctx.world_size
        return float(value)

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds for this rank (model and optimizer), as DCP state dicts."""
        assert self.model is not None and self.optimizer is not None
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None and self.optimizer is not None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_model(self) -> nn.Module | None:
        """On the reporting rank, the whole trained model (for evaluation and publishing); None elsewhere.
        Collective for strategies that must gather it."""
        return self.model if self.reports else None

    def serve(self) -> None:  # pragma: no cover - only for strategies with non-trainer ranks
        """What a non-trainer rank does instead of the loop."""
        raise NotImplementedError

    def finish(self) -> None:  # noqa: B027 - a hook: most strategies have nothing to release
        """Called on every rank after the loop (and after :meth:`serve`)."""
