"""Run methods the ``Registry`` facade had before runs moved to ``registry.runs``; each warns and passes on.

Deprecated: call ``registry.runs.<method>(...)`` (a :class:`~maas.registry.runs.RunStore`) instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping

from maas.registry.entities import Run, RunCheckpoint, RunEval, RunStep
from maas.registry.runs import RunStore, StepLike


def _deprecated(method: str) -> None:
    warnings.warn(
        f"Registry.{method}() is deprecated; use registry.runs.{method}(...) instead",
        DeprecationWarning,
        stacklevel=3,  # the caller of the deprecated method
    )


class DeprecatedRunMethods:
    """The deprecated run methods of :class:`~maas.registry.registry.Registry`."""

    runs: RunStore

    def create_run(
        self,
        config: Mapping[str, object],
        *,
        strategy: str,
        world_size: int,
        name: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Deprecated: use ``registry.runs.create_run``."""
        _deprecated("create_run")
        return self.runs.create_run(config, strategy=strategy, world_size=world_size, name=name, run_id=run_id)

    def start_run(self, run_id: str) -> Run:
        """Deprecated: use ``registry.runs.start_run``."""
        _deprecated("start_run")
        return self.runs.start_run(run_id)

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        model_uri: str | None = None,
    ) -> Run:
        """Deprecated: use ``registry.runs.finish_run``."""
        _deprecated("finish_run")
        return self.runs.finish_run(run_id, status=status, error=error, eval_metrics=eval_metrics, model_uri=model_uri)

    def log_run_steps(self, run_id: str, steps: Iterable[StepLike]) -> int:
        """Deprecated: use ``registry.runs.log_run_steps``."""
        _deprecated("log_run_steps")
        return self.runs.log_run_steps(run_id, steps)

    def log_run_eval(self, run_id: str, step: int, metrics: Mapping[str, float]) -> RunEval:
        """Deprecated: use ``registry.runs.log_run_eval``."""
        _deprecated("log_run_eval")
        return self.runs.log_run_eval(run_id, step, metrics)

    def add_run_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str]) -> RunCheckpoint:
        """Deprecated: use ``registry.runs.add_run_checkpoint``."""
        _deprecated("add_run_checkpoint")
        return self.runs.add_run_checkpoint(run_id, step, path)

    def get_run(self, run_id: str) -> Run:
        """Deprecated: use ``registry.runs.get_run``."""
        _deprecated("get_run")
        return self.runs.get_run(run_id)

    def list_runs(self, limit: int = 50, status: str | None = None) -> list[Run]:
        """Deprecated: use ``registry.runs.list_runs``."""
        _deprecated("list_runs")
        return self.runs.list_runs(limit=limit, status=status)

    def run_steps(self, run_id: str) -> list[RunStep]:
        """Deprecated: use ``registry.runs.run_steps``."""
        _deprecated("run_steps")
        return self.runs.run_steps(run_id)

    def run_evals(self, run_id: str) -> list[RunEval]:
        """Deprecated: use ``registry.runs.run_evals``."""
        _deprecated("run_evals")
        return self.runs.run_evals(run_id)

    def run_checkpoints(self, run_id: str) -> list[RunCheckpoint]:
        """Deprecated: use ``registry.runs.run_checkpoints``."""
        _deprecated("run_checkpoints")
        return self.runs.run_checkpoints(run_id)
