"""Training runs as registry records: the run, its per-step metrics and its checkpoints.

Queries run through the :class:`~maas.registry.store.SqlStore` transactions, so they share its
engine, its SQLite write lock and its retries. ORM rows never leave this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.orm import Session

from maas.errors import Conflict, InvalidInput, NotFound
from maas.registry.entities import RUN_END_STATUSES, RUN_STATUSES, Run, RunCheckpoint, RunEval, RunStep
from maas.registry.schema import RunCheckpointRow, RunEvalRow, RunRow, RunStepRow
from maas.registry.store import SqlStore, _now, _utc
from maas.registry.uri import parse_ref

#: A step as :meth:`RunStore.log_run_steps` takes it: a ``RunStep``, a tuple
#: ``(step, loss[, samples_per_s[, lr[, at]]])`` or a mapping with those keys.
StepLike: TypeAlias = RunStep | Sequence[Any] | Mapping[str, Any]

MIN_PREFIX = 6
_ID = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},32}}")
_CHUNK = 500  # bound the parameters of one IN (...) well under SQLite's limit


def config_hash(config: Mapping[str, Any]) -> str:
    """The sha256 hex digest of ``config`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _canonical(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"a run's config must be JSON-serializable ({exc}); "
            "pass plain values, e.g. `config.model_dump(mode='json')`"
        ) from None


def _check_status(status: str, valid: tuple[str, ...]) -> str:
    if status not in valid:
        raise InvalidInput(f"run status {status!r} is not one of: {', '.join(valid)}")
    return status


def _int(value: Any, what: str, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InvalidInput(f"{what} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise InvalidInput(f"{what} must be an integer >= {minimum}, got {number}")
    return number


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a number, got {value!r}") from None


def _null_nan(value: float | None) -> float | None:
    """NaN (and, for a JSON column, infinity) as NULL: SQLite stores NULL for NaN anyway, and JSON has neither
    (PostgreSQL refuses them). Read back as NaN: the value diverged."""
    return None if value is None or not math.isfinite(value) else value


def _metrics_in(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _null_nan(v) for k, v in metrics.items()}


def _metrics_out(metrics: Mapping[str, float | None] | None) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in (metrics or {}).items()}


def _to_step(item: StepLike) -> RunStep:
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
    step = _int(raw.step, "a step number", 0)
    if not isinstance(raw.at, datetime):
        raise InvalidInput(f"step {step}: 'at' must be a datetime, got {raw.at!r}")
    return RunStep(
        step=step,
        loss=_float(raw.loss, f"step {step}: loss"),
        samples_per_s=None if raw.samples_per_s is None else _float(raw.samples_per_s, f"step {step}: samples_per_s"),
        lr=None if raw.lr is None else _float(raw.lr, f"step {step}: lr"),
        at=_utc(raw.at),
    )


def _to_run(row: RunRow, last_step: int | None = None, last_loss: float | None = None) -> Run:
    return Run(
        id=row.id,
        name=row.name,
        status=row.status,
        strategy=row.strategy,
        world_size=row.world_size,
        config=dict(row.config or {}),
        config_hash=row.config_hash,
        created_at=_utc(row.created_at),
        started_at=_utc(row.started_at) if row.started_at else None,
        ended_at=_utc(row.ended_at) if row.ended_at else None,
        eval_metrics=_metrics_out(row.eval_metrics),
        error=row.error,
        model_uri=row.model_uri,
        last_step=last_step,
        last_loss=(math.nan if last_loss is None else last_loss) if last_step is not None else None,
    )


class RunStore:
    """Every query about training runs, each in one transaction of the given :class:`SqlStore`."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _run_row(s: Session, run_id: str) -> RunRow:
        """The run whose id is ``run_id`` or starts with it (at least 6 hex digits)."""
        key = str(run_id).strip().lower()
        if not _ID.fullmatch(key):
            raise InvalidInput(
                f"run id {run_id!r} is not a run id: give the 32 hex digits `maas runs list` shows, "
                f"or a unique prefix of at least {MIN_PREFIX}"
            )
        row = s.get(RunRow, key)
        if row is not None:
            return row
        matches = s.scalars(select(RunRow).where(RunRow.id.startswith(key)).order_by(RunRow.id).limit(5)).all()
        if not matches:
            raise NotFound(f"no run with id {run_id!r}; see `maas runs list`")
        if len(matches) > 1:
            shown = ", ".join(m.id[:12] for m in matches)
            raise InvalidInput(f"run id prefix {run_id!r} is ambiguous: it matches {shown}; give more digits")
        return matches[0]

    @staticmethod
    def _last_steps(s: Session, run_ids: list[str]) -> dict[str, tuple[int, float | None]]:
        """For each run that logged steps: its highest step and the loss logged at it."""
        out: dict[str, tuple[int, float | None]] = {}
        for i in range(0, len(run_ids), _CHUNK):
            last = (
                select(RunStepRow.run_id, func.max(RunStepRow.step).label("step"))
                .where(RunStepRow.run_id.in_(run_ids[i : i + _CHUNK]))
                .group_by(RunStepRow.run_id)
                .subquery()
            )
            rows = s.execute(
                select(last.c.run_id, last.c.step, RunStepRow.loss).join(
                    RunStepRow, and_(RunStepRow.run_id == last.c.run_id, RunStepRow.step == last.c.step)
                )
            )
            out.update({run_id: (step, loss) for run_id, step, loss in rows})
        return out

    def _run(self, s: Session, row: RunRow) -> Run:
        s.flush()
        return _to_run(row, *self._last_steps(s, [row.id]).get(row.id, (None, None)))

    # --- writing -------------------------------------------------------------------------------

    def create_run(
        self,
        config: Mapping[str, Any],
        *,
        strategy: str,
        world_size: int,
        name: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Record a new run in status ``created``; its id is a fresh uuid4 in hex.

        With ``run_id`` (32 hex digits), the run of that id: created if absent, else returned as it is if it
        has the same config (``Conflict`` if not). The nodes of a multi-node job each call this with the id
        they all derive, so with a shared database they share one record and a node may come first.
        """
        if run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", str(run_id)):
            raise InvalidInput(f"a run id is 32 lowercase hex digits, got {run_id!r}")
        if not isinstance(config, Mapping):
            raise InvalidInput(f"a run's config must be a mapping, got {type(config).__name__}")
        if not isinstance(strategy, str) or not 1 <= len(strategy) <= 64:
            raise InvalidInput(f"strategy must be a name of 1 to 64 characters, got {strategy!r}")
        size = _int(world_size, "world_size", 1)
        name = (name.strip() or None) if name is not None else None
        if name is not None and len(name) > 128:
            raise InvalidInput(f"a run name has at most 128 characters, got {len(name)}")
        canonical = _canonical(config)
        digest = hashlib.sha256(canonical.encode()).hexdigest()

        def tx(s: Session) -> Run:
            if run_id is not None and (existing := s.get(RunRow, run_id)) is not None:
                if existing.config_hash != digest:
                    raise Conflict(
                        f"run {run_id[:12]} already exists with another config; every node of a job must be "
                        "given the same config (or give this job its own --rdzv-id)"
                    )
                return self._run(s, existing)
            row = RunRow(
                id=run_id or uuid.uuid4().hex,
                name=name,
                status="created",
                strategy=strategy,
                world_size=size,
                config=json.loads(canonical),  # stored as hashed: tuples become lists, as JSON has them
                config_hash=digest,
                eval_metrics={},
                created_at=_now(),
            )
            s.add(row)
            return self._run(s, row)

        return self.store._write(tx)

    def start_run(self, run_id: str) -> Run:
        """Mark a run ``running``. Starting it again (a resumed run) keeps its first ``started_at``."""

        def tx(s: Session) -> Run:
            row = self._run_row(s, run_id)
            if row.status == "succeeded":
                raise Conflict(f"run {row.id[:12]} already succeeded; start a new run instead of resuming it")
            row.status = "running"
            row.started_at = row.started_at or _now()
            row.ended_at = None
            row.error = None
            return self._run(s, row)

        return self.store._write(tx)

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
        the ones it has. A run that succeeded stays so (the nodes of a multi-node job each end it)."""
        _check_status(status, RUN_END_STATUSES)
        if model_uri is not None:
            ref = parse_ref(model_uri)
            if ref.version is None:
                raise InvalidInput(f"model_uri {model_uri!r} names no version; give models:/NAME/VERSION")
            model_uri = str(ref)
        metrics = {str(k): _float(v, f"eval metric {k!r}") for k, v in (eval_metrics or {}).items()}

        def tx(s: Session) -> Run:
            row = self._run_row(s, run_id)
            if row.status == "succeeded" and status != "succeeded":
                # Another node of a multi-node job ending badly after the job succeeded: the result stands.
                return self._run(s, row)
            row.status = status
            row.ended_at = _now()
            row.error = error
            if metrics:
                row.eval_metrics = {**(row.eval_metrics or {}), **_metrics_in(metrics)}
            if model_uri is not None:
                row.model_uri = model_uri
            return self._run(s, row)

        return self.store._write(tx)

    def log_run_steps(self, run_id: str, steps: Iterable[StepLike]) -> int:
        """Record step metrics in one transaction; returns how many. A step logged before (a resumed
        run repeating steps since its checkpoint) is replaced, as is a step repeated within ``steps``."""
        by_step = {st.step: st for st in map(_to_step, steps)}
        if not by_step:
            return 0

        def tx(s: Session) -> int:
            rid = self._run_row(s, run_id).id
            numbers = list(by_step)
            for i in range(0, len(numbers), _CHUNK):
                s.execute(
                    delete(RunStepRow).where(RunStepRow.run_id == rid, RunStepRow.step.in_(numbers[i : i + _CHUNK]))
                )
            s.execute(
                insert(RunStepRow),
                [
                    {
                        "run_id": rid,
                        "step": st.step,
                        "loss": _null_nan(st.loss),
                        "samples_per_s": _null_nan(st.samples_per_s),
                        "lr": _null_nan(st.lr),
                        "at": st.at,
                    }
                    for st in by_step.values()
                ],
            )
            return len(by_step)

        return self.store._write(tx)

    def log_run_eval(self, run_id: str, step: int, metrics: Mapping[str, float]) -> RunEval:
        """Record the evaluation after ``step``; an evaluation at the same step again (a resumed run) replaces it."""
        step = _int(step, "an evaluation's step", 0)
        if not isinstance(metrics, Mapping) or not metrics:
            raise InvalidInput(f"an evaluation needs a non-empty mapping of metric name to number, got {metrics!r}")
        values = {str(k): _float(v, f"eval metric {k!r}") for k, v in metrics.items()}
        now = _now()

        def tx(s: Session) -> RunEval:
            rid = self._run_row(s, run_id).id
            s.execute(delete(RunEvalRow).where(RunEvalRow.run_id == rid, RunEvalRow.step == step))
            s.add(RunEvalRow(run_id=rid, step=step, metrics=_metrics_in(values), at=now))
            return RunEval(step=step, metrics=values, at=now)

        return self.store._write(tx)

    def add_run_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str]) -> RunCheckpoint:
        """Record a checkpoint saved at ``step``; one saved again at the same step replaces it."""
        step = _int(step, "a checkpoint's step", 0)
        path = os.fspath(path)
        if not path:
            raise InvalidInput("a checkpoint's path must not be empty")

        def tx(s: Session) -> RunCheckpoint:
            rid = self._run_row(s, run_id).id
            row = s.scalars(
                select(RunCheckpointRow).where(RunCheckpointRow.run_id == rid, RunCheckpointRow.step == step)
            ).first()
            now = _now()
            if row is None:
                s.add(RunCheckpointRow(run_id=rid, step=step, path=path, created_at=now))
            else:
                row.path, row.created_at = path, now
            return RunCheckpoint(step=step, path=path, created_at=now)

        return self.store._write(tx)

    # --- reading -------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> Run:
        return self.store._read(lambda s: self._run(s, self._run_row(s, run_id)))

    def list_runs(self, limit: int = 50, status: str | None = None) -> list[Run]:
        """Runs, newest first."""
        if status is not None:
            _check_status(status, RUN_STATUSES)
        limit = _int(limit, "limit", 1)

        def tx(s: Session) -> list[Run]:
            q = select(RunRow)
            if status is not None:
                q = q.where(RunRow.status == status)
            rows = s.scalars(q.order_by(RunRow.created_at.desc(), RunRow.id).limit(limit)).all()
            last = self._last_steps(s, [r.id for r in rows])
            return [_to_run(r, *last.get(r.id, (None, None))) for r in rows]

        return self.store._read(tx)

    def run_steps(self, run_id: str) -> list[RunStep]:
        """Every logged step of a run, in step order."""

        def tx(s: Session) -> list[RunStep]:
            rid = self._run_row(s, run_id).id
            rows = s.scalars(select(RunStepRow).where(RunStepRow.run_id == rid).order_by(RunStepRow.step))
            return [
                RunStep(
                    step=r.step,
                    loss=math.nan if r.loss is None else r.loss,
                    samples_per_s=r.samples_per_s,
                    lr=r.lr,
                    at=_utc(r.at),
                )
                for r in rows
            ]

        return self.store._read(tx)

    def run_evals(self, run_id: str) -> list[RunEval]:
        """Every evaluation of a run, in step order."""

        def tx(s: Session) -> list[RunEval]:
            rid = self._run_row(s, run_id).id
            rows = s.scalars(select(RunEvalRow).where(RunEvalRow.run_id == rid).order_by(RunEvalRow.step))
            return [
                RunEval(
                    step=r.step,
                    metrics=_metrics_out(r.metrics),
                    at=_utc(r.at),
                )
                for r in rows
            ]

        return self.store._read(tx)

    def run_checkpoints(self, run_id: str) -> list[RunCheckpoint]:
        """Every checkpoint of a run, in step order."""

        def tx(s: Session) -> list[RunCheckpoint]:
            rid = self._run_row(s, run_id).id
            rows = s.scalars(
                select(RunCheckpointRow).where(RunCheckpointRow.run_id == rid).order_by(RunCheckpointRow.step)
            )
            return [RunCheckpoint(step=r.step, path=r.path, created_at=_utc(r.created_at)) for r in rows]

        return self.store._read(tx)
