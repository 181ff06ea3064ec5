"""``pipeline``: the model cut into stages at top-level layers, one stage per rank, run by
``torch.distributed.pipelining`` (GPipe or 1F1B over micro-batches).

Every rank reads the whole global batch (no data parallelism): rank 0 feeds the inputs and the last rank
scores its outputs against the targets. Checkpoints keep the original module's names ("2.weight"), so the
stages' pieces merge into one model's checkpoint and a run resumes onto any split.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from maas.errors import InvalidInput
from maas.training.strategies.base import LossFn, OptimizerFactory, PenaltyFn, Strategy

# Optimizer state keyed by parameter name ("state.2.weight.momentum_buffer", "param_groups.2.weight.lr")
# rather than by position: unique across stages, so DCP keeps every rank's share.
_STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Dtypes an activation may have between stages, numbered for the (pickle-free) shape exchange.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)


# --- splitting ------------------------------------------------------------------------------------------------


class _TopLevel(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name


def _chain_problem(model: nn.Module, names: list[str]) -> str | None:
    """Why ``model.forward`` is not ``x -> child_0 -> child_1 -> ...`` over all its children in order, or None."""
    if type(model).forward is nn.Sequential.forward:
        return None
    try:
        graph = _TopLevel().trace(model)
    except Exception as exc:  # fx raises many kinds on data-dependent control flow
        return f"it cannot be traced ({type(exc).__name__}: {exc})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"forward takes {len(inputs)} inputs, not one"
    prev, called = inputs[0], []
    for node in nodes[1:]:
        if node.op == "output":
            if node.args[0] is not prev:
                return "it does not return the last layer's output"
            break
        if node.op != "call_module" or node.args != (prev,) or node.kwargs:
            return f"it computes {node.format_node()} between layers"
        called.append(node.target)
        prev = node
    if called != names:
        return f"it calls its layers as {called}, not once each in the order {names}"
    return None


def balance(counts: list[int], stages: int) -> list[int]:
    """Where stages 1.. start (indices) so that the largest stage's parameter count is as small as possible.

    Among the best splits the earliest stages take as much as they can, so a parameter-free layer (an
    activation) stays with the layer before it.
    """
    k = len(counts)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    # best[j][i]: the smallest possible largest stage when the first i layers make j stages.
    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for j in range(1, stages + 1):
        for i in range(j, k + 1):
            best[j][i] = min(max(best[j - 1][t], prefix[i] - prefix[t]) for t in range(j - 1, i))
    cap, starts, i = best[stages][k], [], 0
    for s in range(stages - 1):
        j, total = i + 1, counts[i]
        while j < k - (stages - 1 - s) and total + counts[j] <= cap:
            total += counts[j]
            j += 1
        starts.append(j)
        i = j
    return starts


def _starts(names: list[str], split_points: list[str], stages: int) -> list[int]:
    if len(split_points) != stages - 1:
        raise InvalidInput(
            f"strategy.split_points names {len(split_points)} point(s), which make {len(split_points) + 1} stages, "
            f"but the run has {stages} processes; give {stages - 1} split point(s)"
        )
    index = {n: i for i, n in enumerate(names)}
    unknown = [p for p in split_points if p not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in names[:20]) + (", …" if len(names) > 20 else "")
        raise InvalidInput(
            f"strategy.split_points {unknown} are not top-level layers of the model; a split point names the "
            f"layer where a new stage starts, one of: {shown}"
        )
    starts = [index[p] for p in split_points]
    if starts[0] == 0 or any(a >= b for a, b in pairwise(starts)):
        raise InvalidInput(
            f"strategy.split_points {split_points} must be in the model's layer order, without repeats, and not "
            f"its first layer {names[0]!r} (every stage needs at least one layer)"
        )
    return starts


def split_model(model: nn.Module, stages: int, split_points: list[str] | None = None) -> list[nn.Sequential]:
    """Cut ``model`` into ``stages`` consecutive groups of its top-level layers, each an ``nn.Sequential``
    that keeps the layers' names (so a stage's state dict uses the model's own keys).

    ``split_points`` name the layers where stages 1.. start; None balances the stages by parameter count.
    The model must be an ``nn.Sequential`` or a module whose forward runs its children one after another.
    """
    children = list(model.named_children())
    names = [n for n, _ in children]
    problem = "it has no layers" if not children else _chain_problem(model, names)
    if problem is not None:
        raise InvalidInput(
            f"strategy pipeline cuts a model between its top-level layers, but {type(model).__name__}.forward is "
            f"not a plain chain of them: {problem}. Build the model as an nn.Sequential (wrap blocks that need "
            "more than one input in a module of their own), then pick the cuts with strategy.split_points"
        )
    if split_points is None:
        if len(children) < stages:
            raise InvalidInput(
                f"the model has {len(children)} top-level layers, too few for {stages} pipeline stages; use fewer "
                "processes or a model with more layers"
            )
        starts = balance([sum(p.numel() for p in c.parameters()) for _, c in children], stages)
    else:
        starts = _starts(names, split_points, stages)
    return [nn.Sequential(OrderedDict(children[a:b])) for a, b in pairwise([0, *starts, len(children)])]


# --- the strategy ---------------------------------------------------------------------------------------------


class PipelineStrategy(Strategy):
    def data_parallel(self) -> tuple[int, int]:
        return 0, 1

    def _pipeline(self) -> tuple[dist.ProcessGroup | None, int, int]:
        """This rank's pipeline: its process group (None: every rank), this rank's stage, the number of stages."""
        return None, self.ctx.rank, self.ctx.world_size

    def _peer(self, stage: int) -> int:
        """The global rank that holds ``stage`` of this rank's pipeline (what ``dist.send``/``recv`` take)."""
        return stage if self._group is None else dist.get_global_rank(self._group, stage)

    def build(self, model_factory: Callable[[], nn.Module], optimizer_factory: OptimizerFactory) -> None:
        self._factory = model_factory
        self._group, self._stage, self._stages = self._pipeline()
        full = model_factory()
        stages = split_model(full, self._stages, self.config.split_points)
        self._stage_layers = [list(dict(s.named_children())) for s in stages]
        self.model = self.wrapped = stages[self._stage].to(self.ctx.device)
        self.optimizer = optimizer_factory(self.model.parameters())
        self._schedule: Any = None

    @property
    def _is_last(self) -> bool:
        return self._stage == self._stages - 1

    def train_step(
        self,
        micro_batches: list[Any],
        loss_fn: LossFn,
        penalty: PenaltyFn,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> torch.Tensor:
        if self._stages == 1:  # nothing to pipeline
            return super().train_step(micro_batches, loss_fn, penalty, autocast)
        assert self.model is not None and self.optimizer is not None
        device = self.ctx.device
        if not all(isinstance(t, torch.Tensor) for mb in micro_batches for t in mb[:2]):
            raise InvalidInput("strategy pipeline feeds the model one input tensor per sample and scores one target")
        x = torch.cat([mb[0] for mb in micro_batches]).to(device)
        y = torch.cat([mb[1] for mb in micro_batches]).to(device)
        n = self.config.microbatches
        if x.shape[0] % n:
            raise InvalidInput(
                f"the global batch of {x.shape[0]} does not split into strategy.microbatches {n}; make batch_size "
                f"a multiple of {n}"
            )
        if self._schedule is None:
            self._schedule = self._make_schedule(x[: x.shape[0] // n], loss_fn, autocast)
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        with autocast():
            if self._stage == 0:
                self._schedule.step(x)
            elif self._is_last:
                self._schedule.step(target=y, losses=losses, return_outputs=False)
            else:
                self._schedule.step()
            extra = penalty(self.model) if next(self.model.parameters(), None) is not None else None
            if extra is not None:
                extra.backward()
        self.optimizer.step()
        # The last stage knows the data loss, each stage its own penalty: their sum is the model's loss.
        total = torch.zeros((), device=device)
        if losses:
            total += torch.stack([loss.detach().float() for loss in losses]).sum()
        if extra is not None:
            total += extra.detach().float()
        dist.all_reduce(total, group=self._group)
        return total

    def _make_schedule(
        self, x_mb: torch.Tensor, loss_fn: LossFn, autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        assert self.model is not None
        example_in, example_out = self._infer_shapes(x_mb, autocast)
        stage = PipelineStage(
            self.model,
            self._stage,
            self._stages,
            self.ctx.device,
            input_args=example_in,
            output_args=example_out,
            group=self._group,
        )
        n = self.config.microbatches

        # The schedules sum the micro-batches' backward passes: dividing each (mean) loss by their number
        # gives the gradient of the mean loss over the global batch, as one process computes it.
        def mb_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_fn(output, target) / n

        cls = ScheduleGPipe if self.config.schedule == "gpipe" else Schedule1F1B
        return cls(stage, n_microbatches=n, loss_fn=mb_loss, scale_grads=False)

    def _infer_shapes(
        self, x_mb: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Example input and output of this stage for one micro-batch, passed down the pipeline as plain
        tensors (torch's own inference sends pickled objects). Runs each stage once, without changing
        its weights, statistics or the random stream."""
        assert self.model is not None
        rank, device = self._stage, self.ctx.device
        example_in = x_mb if rank == 0 else _recv_like(self._peer(rank - 1), device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), autocast():
                out = self.model(example_in.detach())
        finally:
            self.model.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise InvalidInput(
                f"pipeline stage {rank} (layers {self._stage_layers[rank]}) returns {type(out).__name__}; a stage "
                "must hand one tensor to the next, so choose strategy.split_points after layers that return one"
            )
        if not self._is_last:
            _send_like(out, self._peer(rank + 1), device)
        # Received activations and outputs carry gradients; the pipeline's own input does not.
        if rank > 0:
            example_in.requires_grad_(example_in.is_floating_point())
        example_out = torch.empty(out.shape, dtype=out.dtype, device=device)
        return example_in, example_out.requires_grad_(out.is_floating_point())

    def mean_over_trainers(self, value: torch.Tensor) -> float:
        return float(value)  # every stage already holds the whole model's loss

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=_STATE_OPTIONS)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.model is not None and self.optimizer is not None
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_STATE_OPTIONS,
        )

    def full_model(self) -> nn.Module | None:
        """Collective: every stage sends its tensors to stage 0, in the order of its sorted state-dict keys."""
        assert self.model is not None
        if self._stages == 1:
            return self.model
        if self._stage != 0:
            own = self.model.state_dict()
            for key in sorted(own):
                dist.send(own[key].detach().contiguous(), dst=self._peer(0))
            return None
        full = self._factory().to(self.ctx.device)
        target = full.state_dict()
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                target[key].copy_(value)
            for src in range(1, self._stages):
                layers = set(self._stage_layers[src])
                for key in sorted(k for k in target if k.split(".", 1)[0] in layers):
                    buf = torch.empty_like(target[key], memory_format=torch.contiguous_format)
                    dist.recv(buf, src=self._peer(src))
                    target[key].copy_(buf)
        return full


_HEADER = 10  # [dtype, ndim, *shape] of an activation, zero-padded


def _send_like(t: torch.Tensor, dst: int, device: torch.device) -> None:
    if t.dtype not in _DTYPES or t.dim() > _HEADER - 2:
        raise InvalidInput(
            f"a pipeline stage returns a {t.dtype} tensor of {t.dim()} dims; between stages go tensors of at most "
            f"{_HEADER - 2} dims of {', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}"
        )
    head = torch.zeros(_HEADER, dtype=torch.int64)
    head[: 2 + t.dim()] = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape])
    dist.send(head.to(device), dst)


def _recv_like(src: int, device: torch.device) -> torch.Tensor:
    head = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.recv(head, src)
    dtype, ndim = _DTYPES[int(head[0])], int(head[1])
    return torch.zeros([int(s) for s in head[2 : 2 + ndim]], dtype=dtype, device=device)
