"""The one training loop every strategy shares: data, steps, accumulation, metrics, checkpoints, evaluation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import torch
from torch import nn

from maas.imports import resolve
from maas.training import checkpoint
from maas.training.components import build_loss, build_metric, build_optimizer, lr_factor, regularization
from maas.training.config import TrainConfig
from maas.training.data import ShardedBatches, gather
from maas.training.strategies import Strategy, WorkerContext, build_strategy

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    model: nn.Module | None  # the whole trained model on the reporting rank, else None
    steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    final_loss: float | None = None


class Progress(Protocol):
    """Where the reporting rank tells how far the run is; the CLI draws it (``maas.cli.train_progress``).

    A worker builds one from an import path (``train(..., progress="package.module:factory")``), so whatever
    draws it lives above the library and is handed down by name.
    """

    def start(self, total: int, completed: int) -> None:
        """Training begins (at ``completed`` of ``total`` steps when it resumes)."""

    def step(self, step: int, loss: float, samples_per_s: float, lr: float) -> None:
        """Every ``log_every`` steps: the mean loss and the throughput since the last report."""

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """The eval metrics after ``step`` (during training, and at the end)."""

    def stop(self) -> None:
        """Training is over (or failed): leave the display as it is."""


class Reporter:
    """Rank 0's window on the run: progress to ``progress``, step metrics to the registry, checkpoints recorded."""

    def __init__(
        self,
        ctx: WorkerContext,
        total_steps: int,
        registry: Any | None,
        progress: Progress | None = None,
        start: int = 0,
    ) -> None:
        self.ctx = ctx
        self.registry = registry
        self.total = total_steps
        self.start = start
        self.pending: list[Any] = []
        self.progress = progress

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start(self.total, self.start)
        return self

    def step(self, step: int, loss: float, samples_per_s: float, lr: float) -> None:
        from maas.registry.entities import RunStep

        if self.progress is not None:
            self.progress.step(step, loss, samples_per_s, lr)
        self.pending.append(RunStep(step=step, loss=loss, samples_per_s=samples_per_s, lr=lr, at=datetime.now(UTC)))

    def flush(self) -> None:
        if self.registry is not None and self.pending:
            self.registry.runs.log_run_steps(self.ctx.run_id, self.pending)
        self.pending = []

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.evaluation(step, metrics)
        if self.registry is not None:
            self.registry.runs.log_run_eval(self.ctx.run_id, step, metrics)

    def checkpoint(self, step: int, path: Any) -> None:
        self.flush()
        if self.registry is not None:
            self.registry.runs.add_run_checkpoint(self.ctx.run_id, step, str(path))

    def __exit__(self, *exc: object) -> None:
        self.flush()
        if self.progress is not None:
            self.progress.stop()


def _seed_step(cfg: TrainConfig, ctx: WorkerContext, step: int, dp_rank: int) -> None:
    # Seeding per step (not once) makes dropout and friends depend only on (seed, step, rank), so a run
    # resumed from a checkpoint draws the same random numbers as one that never stopped. By data-parallel
    # rank, so every stage of a pipeline, and a worker of a parameter server, draws what DDP's rank would.
    seed = cfg.seed * 1_000_003 + step * 9973 + dp_rank
    torch.default_generator.manual_seed(seed)  # torch.manual_seed costs ~100x more per call (it seeds every device)
    if ctx.device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _state(strategy: Strategy, step: int) -> dict[str, Any]:
    return {**strategy.state_dict(), "loop": {"step": torch.tensor(step)}}


def evaluate(model: nn.Module, dataset: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """The eval metric of ``model`` over the whole evaluation set (on one rank)."""
    assert cfg.eval is not None
    metric = build_metric(cfg.eval)
    outputs, targets = [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        idx = torch.arange(len(dataset))
        for chunk in idx.split(cfg.eval.batch_size):
            x, y = gather(dataset, chunk)
            outputs.append(model(x.to(device)).float().cpu())
            targets.append(y)
    model.train(was_training)
    return {cfg.eval.metric.rsplit(":", 1)[-1]: metric(torch.cat(outputs), torch.cat(targets))}


@contextlib.contextmanager
def _precision(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    if cfg.precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def train_loop(
    cfg: TrainConfig, ctx: WorkerContext, registry: Any | None = None, progress: Progress | None = None
) -> LoopResult:
    """Train on this rank. Every rank calls it; the strategy's reporting rank records the run and tells
    ``progress``. Resumes from the run's last complete checkpoint."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    strategy: Strategy = build_strategy(cfg.strategy, ctx)
    factory = resolve(cfg.model.factory, "model.factory")

    def make_model() -> nn.Module:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model: nn.Module = factory(**cfg.model.kwargs)
        return model

    strategy.build(make_model, lambda params: build_optimizer(cfg.optimizer, params))
    if not strategy.is_trainer:
        strategy.serve()
        strategy.finish()
        return LoopResult(model=None, steps=0)
    dp_rank, dp_size = strategy.data_parallel()
    cfg.check_world(dp_size)
    loss_fn = build_loss(cfg.loss)

    train_set = resolve(cfg.data.train, "data.train")(**cfg.data.kwargs)
    batches = ShardedBatches(
        train_set,
        global_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.seed,
        replicate=cfg.data.sharding == "replicate",
    )
    total = cfg.steps or (cfg.epochs or 1) * batches.steps_per_epoch
    factor = lr_factor(cfg.schedule, cfg.optimizer.lr, total)

    step = saved = 0
    found = checkpoint.agreed_latest(ctx.run_dir, process_group=strategy.process_group)
    if found is not None:
        state = _state(strategy, 0)
        checkpoint.load(found[1], state, process_group=strategy.process_group)
        strategy.load_state_dict(state)
        step = saved = int(state["loop"]["step"])
        if strategy.reports:
            log.info("resuming run %s from step %d (%s)", ctx.run_id, step, found[1])

    def penalty(module: nn.Module) -> torch.Tensor | None:
        return regularization(cfg.regularization, module)

    eval_set: Any = None

    def evaluation(at: int, rep: Reporter | None, model: nn.Module | None) -> dict[str, float]:
        """The eval metrics of ``model``, the whole model after step ``at`` that :meth:`Strategy.full_model`
        gives the reporting rank; {} on the other ranks (where it is None)."""
        nonlocal eval_set
        if model is None or not cfg.data.eval or not cfg.eval:
            return {}
        if eval_set is None:
            eval_set = resolve(cfg.data.eval, "data.eval")(**cfg.data.kwargs)
        metrics = evaluate(model, eval_set, cfg, ctx.device)
        if rep is not None:
            rep.evaluation(at, metrics)
        return metrics

    every_eval = cfg.eval.every_steps if cfg.eval else None  # the config refuses it without data.eval

    def save(at: int, rep: Reporter | None) -> int:
        """A complete checkpoint of every trainer rank at step ``at`` (collective)."""
        state = _state(strategy, at)
        path = checkpoint.save(ctx.run_dir, at, state, keep=cfg.checkpoint.keep, process_group=strategy.process_group)
        if rep is not None:
            rep.checkpoint(at, path)
        return at

    reporter: contextlib.AbstractContextManager[Any] = (
        Reporter(ctx, total, registry, progress, start=step) if strategy.reports else contextlib.nullcontext()
    )
    loss_value: float | None = None
    with reporter as rep:
        window_start, window_steps = time.perf_counter(), 0
        running = torch.zeros((), device=ctx.device)
        while step < total:
            epoch, offset = divmod(step, batches.steps_per_epoch)
            for micro_batches in batches.epoch(epoch, offset):
                _seed_step(cfg, ctx, step, dp_rank)
                lr = cfg.optimizer.lr * factor(step)
                strategy.set_lr(lr)
                running += strategy.train_step(micro_batches, loss_fn, penalty, lambda: _precision(cfg, ctx.device))
                step += 1
                window_steps += 1
                if step % cfg.log_every == 0 or step == total:
                    loss_value = strategy.mean_over_trainers(running / window_steps)
                    elapsed = time.perf_counter() - window_start
                    if rep is not None:
                        rep.step(step, loss_value, cfg.batch_size * window_steps / max(elapsed, 1e-9), lr)
                    window_start, window_steps = time.perf_counter(), 0
                    running.zero_()
                if every_eval and step % every_eval == 0 and step < total:
                    paused = time.perf_counter()
                    evaluation(step, rep, strategy.full_model())  # collective: stages or shards are gathered
                    window_start += time.perf_counter() - paused  # samples/s counts training time only
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                    saved = save(step, rep)
                if step >= total:
                    break
        if saved != step or found is None:
            save(step, rep)
        model = strategy.full_model()
        metrics = evaluation(step, rep, model)

    strategy.finish()
    metrics = dict(metrics)  # a copy: the reporter recorded the evaluation as it was
    if loss_value is not None:
        metrics.setdefault("final_loss", loss_value)
    return LoopResult(model=model, steps=step, eval_metrics=metrics, final_loss=loss_value)
