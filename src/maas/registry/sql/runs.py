"""Training runs in SQL: the run, its per-step metrics, evaluations and checkpoints.

Statements run in the transactions of the store's :class:`~maas.registry.sql.engine.Database`, so they
share its engine, its SQLite write lock and its retries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.orm import Session

from maas.errors import Conflict, InvalidInput, NotFound
from maas.registry.entities import RUN_END_STATUSES, RUN_STATUSES, Run, RunCheckpoint, RunEval, RunStep
from maas.registry.runs import (
    RunStore,
    StepLike,
    as_float,
    as_int,
    canonical_json,
    check_status,
    run_key,
    to_step,
)
from maas.registry.schema import RunCheckpointRow, RunEvalRow, RunRow, RunStepRow
from maas.registry.sql.engine import Database, now, utc
from maas.registry.uri import parse_ref

_CHUNK = 500  # bound the parameters of one IN (...) well under SQLite's limit


def _null_nan(value: float | None) -> float | None:
    """NaN (and, for a JSON column, infinity) as NULL: SQLite stores NULL for NaN anyway, and JSON has neither
    (PostgreSQL refuses them). Read back as NaN: the value diverged."""
    return None if value is None or not math.isfinite(value) else value


def _metrics_in(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _null_nan(v) for k, v in metrics.items()}


def _metrics_out(metrics: Mapping[str, float | None] | None) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in (metrics or {}).items()}


def _to_run(row: RunRow, last_step: int | None = None, last_loss: float | None = None) -> Run:
    return Run(
        id=row.id,
        name=row.name,
        status=row.status,
        strategy=row.strategy,
        world_size=row.world_size,
        config=dict(row.config or {}),
        config_hash=row.config_hash,
        created_at=utc(row.created_at),
        started_at=utc(row.started_at) if row.started_at else None,
        ended_at=utc(row.ended_at) if row.ended_at else None,
        eval_metrics=_metrics_out(row.eval_metrics),
        error=row.error,
        model_uri=row.model_uri,
        last_step=last_step,
        last_loss=(math.nan if last_loss is None else last_loss) if last_step is not None else None,
    )


def _run_row(s: Session, run_id: str, *, lock: bool = False) -> RunRow:
    """The run whose id is ``run_id`` or starts with it (at least 6 hex digits); with ``lock``, its row locked until
    the transaction ends, so that a change made from what it holds sees the change before it (PostgreSQL)."""
    key = run_key(run_id)
    row = s.get(RunRow, key, with_for_update=lock)
    if row is not None:
        return row
    q = select(RunRow).where(RunRow.id.startswith(key)).order_by(RunRow.id).limit(5)
    matches = s.scalars(q.with_for_update() if lock else q).all()
    if not matches:
        raise NotFound(f"no run with id {run_id!r}; see `maas runs list`")
    if len(matches) > 1:
        shown = ", ".join(m.id[:12] for m in matches)
        raise InvalidInput(f"run id prefix {run_id!r} is ambiguous: it matches {shown}; give more digits")
    return matches[0]


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


def _run(s: Session, row: RunRow) -> Run:
    s.flush()
    return _to_run(row, *_last_steps(s, [row.id]).get(row.id, (None, None)))


class SqlRunStore(RunStore):
    """The :class:`~maas.registry.runs.RunStore` of a SQL database; each method one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
        if run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", str(run_id)):
            raise InvalidInput(f"a run id is 32 lowercase hex digits, got {run_id!r}")
        if not isinstance(config, Mapping):
            raise InvalidInput(f"a run's config must be a mapping, got {type(config).__name__}")
        if not isinstance(strategy, str) or not 1 <= len(strategy) <= 64:
            raise InvalidInput(f"strategy must be a name of 1 to 64 characters, got {strategy!r}")
        size = as_int(world_size, "world_size", 1)
        name = (name.strip() or None) if name is not None else None
        if name is not None and len(name) > 128:
            raise InvalidInput(f"a run name has at most 128 characters, got {len(name)}")
        canonical = canonical_json(config)
        digest = hashlib.sha256(canonical.encode()).hexdigest()

        def tx(s: Session) -> Run:
            if run_id is not None and (existing := s.get(RunRow, run_id)) is not None:
                if existing.config_hash != digest:
                    raise Conflict(
                        f"run {run_id[:12]} already exists with another config; every node of a job must be "
                        "given the same config (or give this job its own --rdzv-id)"
                    )
                return _run(s, existing)
            row = RunRow(
                id=run_id or uuid.uuid4().hex,
                name=name,
                status="created",
                strategy=strategy,
                world_size=size,
                config=json.loads(canonical),  # stored as hashed: tuples become lists, as JSON has them
                config_hash=digest,
                eval_metrics={},
                created_at=now(),
            )
            s.add(row)
            return _run(s, row)

        return self.db.write(tx)

    def start_run(self, run_id: str) -> Run:
        def tx(s: Session) -> Run:
            row = _run_row(s, run_id, lock=True)
            if row.status == "succeeded":
                raise Conflict(f"run {row.id[:12]} already succeeded; start a new run instead of resuming it")
            row.status = "running"
            row.started_at = row.started_at or now()
            row.ended_at = None
            row.error = None
            return _run(s, row)

        return self.db.write(tx)

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        model_uri: str | None = None,
    ) -> Run:
        check_status(status, RUN_END_STATUSES)
        if model_uri is not None:
            ref = parse_ref(model_uri)
            if ref.version is None:
                raise InvalidInput(f"model_uri {model_uri!r} names no version; give models:/NAME/VERSION")
            model_uri = str(ref)
        metrics = {str(k): as_float(v, f"eval metric {k!r}") for k, v in (eval_metrics or {}).items()}

        def tx(s: Session) -> Run:
            row = _run_row(s, run_id, lock=True)
            if row.status == "succeeded" and status != "succeeded":
                # Another node of a multi-node job ending badly after the job succeeded: the result stands.
                return _run(s, row)
            row.status = status
            row.ended_at = now()
            row.error = error
            if metrics:
                row.eval_metrics = {**(row.eval_metrics or {}), **_metrics_in(metrics)}
            if model_uri is not None:
                row.model_uri = model_uri
            return _run(s, row)

        return self.db.write(tx)

    def log_run_steps(self, run_id: str, steps: Iterable[StepLike]) -> int:
        by_step = {st.step: st for st in map(to_step, steps)}
        if not by_step:
            return 0

        def tx(s: Session) -> int:
            rid = _run_row(s, run_id).id
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

        return self.db.write(tx)

    def log_run_eval(self, run_id: str, step: int, metrics: Mapping[str, float]) -> RunEval:
        step = as_int(step, "an evaluation's step", 0)
        if not isinstance(metrics, Mapping) or not metrics:
            raise InvalidInput(f"an evaluation needs a non-empty mapping of metric name to number, got {metrics!r}")
        values = {str(k): as_float(v, f"eval metric {k!r}") for k, v in metrics.items()}
        at = now()

        def tx(s: Session) -> RunEval:
            rid = _run_row(s, run_id).id
            s.execute(delete(RunEvalRow).where(RunEvalRow.run_id == rid, RunEvalRow.step == step))
            s.add(RunEvalRow(run_id=rid, step=step, metrics=_metrics_in(values), at=at))
            return RunEval(step=step, metrics=values, at=at)

        return self.db.write(tx)

    def add_run_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str]) -> RunCheckpoint:
        step = as_int(step, "a checkpoint's step", 0)
        path = os.fspath(path)
        if not path:
            raise InvalidInput("a checkpoint's path must not be empty")

        def tx(s: Session) -> RunCheckpoint:
            rid = _run_row(s, run_id).id
            row = s.scalars(
                select(RunCheckpointRow).where(RunCheckpointRow.run_id == rid, RunCheckpointRow.step == step)
            ).first()
            at = now()
            if row is None:
                s.add(RunCheckpointRow(run_id=rid, step=step, path=path, created_at=at))
            else:
                row.path, row.created_at = path, at
            return RunCheckpoint(step=step, path=path, created_at=at)

        return self.db.write(tx)

    # --- reading -------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> Run:
        return self.db.read(lambda s: _run(s, _run_row(s, run_id)))

    def list_runs(self, limit: int = 50, status: str | None = None) -> list[Run]:
        if status is not None:
            check_status(status, RUN_STATUSES)
        limit = as_int(limit, "limit", 1)

        def tx(s: Session) -> list[Run]:
            q = select(RunRow)
            if status is not None:
                q = q.where(RunRow.status == status)
            rows = s.scalars(q.order_by(RunRow.created_at.desc(), RunRow.id).limit(limit)).all()
            last = _last_steps(s, [r.id for r in rows])
            return [_to_run(r, *last.get(r.id, (None, None))) for r in rows]

        return self.db.read(tx)

    def run_steps(self, run_id: str) -> list[RunStep]:
        def tx(s: Session) -> list[RunStep]:
            rid = _run_row(s, run_id).id
            rows = s.scalars(select(RunStepRow).where(RunStepRow.run_id == rid).order_by(RunStepRow.step))
            return [
                RunStep(
                    step=r.step,
                    loss=math.nan if r.loss is None else r.loss,
                    samples_per_s=r.samples_per_s,
                    lr=r.lr,
                    at=utc(r.at),
                )
                for r in rows
            ]

        return self.db.read(tx)

    def run_evals(self, run_id: str) -> list[RunEval]:
        def tx(s: Session) -> list[RunEval]:
            rid = _run_row(s, run_id).id
            rows = s.scalars(select(RunEvalRow).where(RunEvalRow.run_id == rid).order_by(RunEvalRow.step))
            return [RunEval(step=r.step, metrics=_metrics_out(r.metrics), at=utc(r.at)) for r in rows]

        return self.db.read(tx)

    def run_checkpoints(self, run_id: str) -> list[RunCheckpoint]:
        def tx(s: Session) -> list[RunCheckpoint]:
            rid = _run_row(s, run_id).id
            rows = s.scalars(
                select(RunCheckpointRow).where(RunCheckpointRow.run_id == rid).order_by(RunCheckpointRow.step)
            )
            return [RunCheckpoint(step=r.step, path=r.path, created_at=utc(r.created_at)) for r in rows]

        return self.db.read(tx)
