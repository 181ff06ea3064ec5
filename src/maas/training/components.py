"""Builders for the loop's parts from their configs: loss, optimizer, schedule, regularisation, metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from maas.imports import resolve
from maas.training.config import EvalConfig, OptimizerConfig, RegularizationConfig, ScheduleConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(name: str) -> LossFn:
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    if name == "mse":
        return nn.functional.mse_loss
    fn: LossFn = resolve(name, "loss")
    return fn


def build_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, base_lr: float, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step (LambdaLR), warm-up included."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        s = step - cfg.warmup_steps
        if cfg.name == "step":
            return float(cfg.gamma ** (s // cfg.step_size))
        if cfg.name == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            floor = cfg.min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
        return 1.0

    return factor


def regularization(cfg: RegularizationConfig, model: nn.Module) -> torch.Tensor | None:
    """The L1/L2 penalty on the model's weights (biases and norms included), or None when both are 0."""
    if not cfg.l1 and not cfg.l2:
        return None
    total = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        if cfg.l1:
            total = total + cfg.l1 * p.abs().sum()
        if cfg.l2:
            total = total + cfg.l2 * p.pow(2).sum()
    return total


def build_metric(cfg: EvalConfig) -> Callable[[torch.Tensor, torch.Tensor], float]:
    if cfg.metric == "accuracy":
        return lambda out, y: float((out.argmax(dim=-1) == y).float().mean())
    if cfg.metric == "mse":
        return lambda out, y: float(nn.functional.mse_loss(out.float(), y.float()))
    fn: Callable[[torch.Tensor, torch.Tensor], float] = resolve(cfg.metric, "eval.metric")
    return fn
