"""Training runs in the registry: :class:`RunStore`, the run API (``Registry().runs``), and the rules
its inputs follow whatever stores them.

A run is recorded as it goes: created with its config, started, its step metrics, evaluations and
checkpoints logged, finished with a status and what it published. The SQL implementation is
:mod:`maas.registry.sql.runs`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

from maas.errors import InvalidInput
from maas.registry.entities import Run, RunCheckpoint, RunEval, RunStep

#: A step as :meth:`RunStore.log_run_steps` takes it: a ``RunStep``, a tuple
#: ``(step, loss[, samples_per_s[, lr[, at]]])`` or a mapping with those keys.
StepLike: TypeAlias = RunStep | Sequence[Any] | Mapping[str, Any]

#: The fewest hex digits of a run id that name a run.
MIN_PREFIX = 6
_ID = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},32}}")


class RunStore(ABC):
    """Training runs: ``Registry().runs``, the Python API behind ``maas runs`` and ``maas train``.

    ``run_id`` is a run's 32 hex digits or a unique prefix of at least 6 (case-insensitive). Each call
    is one transaction; a run that does not exist is ``NotFound``, malformed input ``InvalidInput``.
    Everything returned is a frozen dataclass of :mod:`maas.registry.entities`.
    """

    # --- writing -------------------------------------------------------------------------------

    @abstractmethod
    def create_run(
        self,
        config: Mapping[str, Any],
        *,
        strategy: str,
        world_size: int,
        name: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Record a new run in status ``created``; its id is a fresh uuid4 in hex. ``config`` must be plain
        JSON values and is hashed as canonical JSON into ``config_hash`` (see :func:`config_hash`).

        With ``run_id`` (32 hex digits), the run of that id: created if absent, else returned as it is if it
        has the same config (``Conflict`` if not). The nodes of a multi-node job each call this with the id
        they all derive, so with a shared database they share one record and a node may come first.
        """

    @abstractmethod
    def start_run(self, run_id: str) -> Run:
        """Mark a run ``running``. Starting it again (a resumed run) keeps its first ``started_at``; a run that
        succeeded cannot start again (``Conflict``)."""

    @abstractmethod
    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        model_uri: str | None = None,
    ) -> Run:
        """End a run with ``status`` (succeeded, failed or interrupted); ``eval_metrics`` merge into
        the ones it has, ``model_uri`` (``models:/NAME/VERSION``) is what it published. A run that
        succeeded stays so (the nodes of a multi-node job each end it)."""

    @abstractmethod
    def log_run_steps(self, run_id: str, steps: Iterable[StepLike]) -> int:
        """Record step metrics in one transaction; returns how many. A step logged before (a resumed
        run repeating steps since its checkpoint) is replaced, as is a step repeated within ``steps``."""

    @abstractmethod
    def log_run_eval(self, run_id: str, step: int, metrics: Mapping[str, float]) -> RunEval:
        """Record the evaluation after ``step``; an evaluation at the same step again (a resumed run) replaces it."""

    @abstractmethod
    def add_run_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str]) -> RunCheckpoint:
        """Record a checkpoint saved at ``step``; one saved again at the same step replaces it."""

    # --- reading -------------------------------------------------------------------------------

    @abstractmethod
    def get_run(self, run_id: str) -> Run:
        """A run by its id or a unique prefix of at least 6 hex digits."""

    @abstractmethod
    def list_runs(self, limit: int = 50, status: str | None = None) -> list[Run]:
        """Runs, newest first, optionally only those with ``status``."""

    @abstractmethod
    def run_steps(self, run_id: str) -> list[RunStep]:
        """Every logged step of a run, in step order."""

    @abstractmethod
    def run_evals(self, run_id: str) -> list[RunEval]:
        """Every evaluation of a run, in step order."""

    @abstractmethod
    def run_checkpoints(self, run_id: str) -> list[RunCheckpoint]:
        """Every checkpoint of a run, in step order."""


# --- the rules of the inputs --------------------------------------------------------------------


def config_hash(config: Mapping[str, Any]) -> str:
    """The sha256 hex digest of ``config`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def canonical_json(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"a run's config must be JSON-serializable ({exc}); "
            "pass plain values, e.g. `config.model_dump(mode='json')`"
        ) from None


def run_key(run_id: str) -> str:
    """``run_id`` normalised for lookup: a full id or a prefix, lowercase hex."""
    key = str(run_id).strip().lower()
    if not _ID.fullmatch(key):
        raise InvalidInput(
            f"run id {run_id!r} is not a run id: give the 32 hex digits `maas runs list` shows, "
            f"or a unique prefix of at least {MIN_PREFIX}"
        )
    return key


def check_status(status: str, valid: tuple[str, ...]) -> str:
    if status not in valid:
        raise InvalidInput(f"run status {status!r} is not one of: {', '.join(valid)}")
    return status


def as_int(value: Any, what: str, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InvalidInput(f"{what} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise InvalidInput(f"{what} must be an integer >= {minimum}, got {number}")
    return number


def as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a number, got {value!r}") from None


def to_step(item: StepLike) -> RunStep:
    """A :data:`StepLike` as a checked ``RunStep`` with an aware ``at``."""
    try:
        if isinstance(item, RunStep):
            raw = item
        elif isinstance(item, Mapping):
            raw = RunStep(**item)
        elif isinstance(item, Sequence) and not isinstance(item, str) and 2 <= len(item) <= 5:
            raw = RunStep(*item)
        else:
            raise TypeError
    except TypeError:
        raise InvalidInput(
            f"a step must be a RunStep, a tuple (step, loss[, samples_per_s[, lr[, at]]]) or a mapping with those "
            f"keys, got {item!r}"
        ) from None
    step = as_int(raw.step, "a step number", 0)
    if not isinstance(raw.at, datetime):
        raise InvalidInput(f"step {step}: 'at' must be a datetime, got {raw.at!r}")
    return RunStep(
        step=step,
        loss=as_float(raw.loss, f"step {step}: loss"),
        samples_per_s=None if raw.samples_per_s is None else as_float(raw.samples_per_s, f"step {step}: samples_per_s"),
        lr=None if raw.lr is None else as_float(raw.lr, f"step {step}: lr"),
        at=raw.at if raw.at.tzinfo else raw.at.replace(tzinfo=UTC),
    )
