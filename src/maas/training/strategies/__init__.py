"""Parallel strategies, one module each, found by the config's ``strategy.name`` and imported on first use."""

from __future__ import annotations

from typing import Any

from maas.imports import load_entry
from maas.training.strategies.base import Strategy, WorkerContext

#: strategy name -> "module:class"
STRATEGIES: dict[str, str] = {
    "single": "maas.training.strategies.single:SingleStrategy",
    "ddp": "maas.training.strategies.ddp:DDPStrategy",
    "parameter_server": "maas.training.strategies.parameter_server:ParameterServerStrategy",
    "pipeline": "maas.training.strategies.pipeline:PipelineStrategy",
    "hybrid": "maas.training.strategies.hybrid:HybridStrategy",
}


def build_strategy(config: Any, ctx: WorkerContext) -> Strategy:
    cls: type[Strategy] = load_entry(STRATEGIES[config.name])
    return cls(config, ctx)


__all__ = ["STRATEGIES", "Strategy", "WorkerContext", "build_strategy"]
