"""Usage metering: what each key did with each model version, per UTC minute, in the metadata database
(``usage_minutes``), and the totals ``maas usage`` shows.

Servers add to the rows (never overwrite them), so any number of processes can record into one database. A request
is recorded under ``-`` for its key when auth is off, and under model ``-`` when it named no model (metadata,
``/metrics``, a model it may not use).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from maas.access.limits_sql import upsert_add
from maas.errors import InvalidInput
from maas.registry.schema_access import UsageRow
from maas.registry.sql.engine import Database, utc

#: The key of a usage row: key id (``-`` without auth), model (``-`` when none), version (0: none), minute.
UsageKey = tuple[str, str, int, datetime]
PERIODS = ("minute", "hour", "day", "total")


@dataclass
class Counters:
    """What requests used, added up."""

    requests: int = 0
    errors: int = 0
    items: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_s: float = 0.0

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class UsageTotal:
    """Usage of one key, model and version over one period (``period`` its start; None for the whole span)."""

    key_id: str
    model: str
    version: int
    period: datetime | None
    requests: int
    errors: int
    items: int
    prompt_tokens: int
    completion_tokens: int
    compute_s: float

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["period"] = self.period.isoformat() if self.period else None
        out["compute_s"] = round(self.compute_s, 6)
        out["tokens"] = self.tokens
        return out


def minute_of(at: datetime) -> datetime:
    return utc(at).replace(second=0, microsecond=0)


def _period(minute: datetime, by: str) -> datetime | None:
    if by == "minute":
        return minute
    if by == "hour":
        return minute.replace(minute=0)
    if by == "day":
        return minute.replace(hour=0, minute=0)
    return None


class UsageStore:
    """The usage rows in ``db``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, usage: Mapping[UsageKey, Counters]) -> None:
        """Add ``usage`` to the rows (made when missing), in one transaction: all of it is recorded, or none."""
        rows = [
            {"key_id": k, "model": m, "version": v, "minute": minute, **asdict(c)}
            for (k, m, v, minute), c in usage.items()
        ]
        if rows:
            table: Any = UsageRow.__table__
            added = tuple(f.name for f in fields(Counters))
            self.db.write(lambda s: upsert_add(s, table, rows, ("key_id", "model", "version", "minute"), added))

    def query(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "day",
    ) -> list[UsageTotal]:
        """Totals per key, model, version and period (``by``: minute, hour, day, or total), oldest period first.
        Minute rows are read in a stream and added up here, the same on SQLite and PostgreSQL."""
        if by not in PERIODS:
            raise InvalidInput(f"--by {by!r} is not one of {', '.join(PERIODS)}")
        stmt = select(UsageRow)
        if key_id is not None:
            stmt = stmt.where(UsageRow.key_id == key_id)
        if model is not None:
            stmt = stmt.where(UsageRow.model == model)
        if since is not None:
            stmt = stmt.where(UsageRow.minute >= minute_of(since))
        if until is not None:
            stmt = stmt.where(UsageRow.minute < utc(until))

        def read(s: Session) -> dict[tuple[str, str, int, datetime | None], Counters]:
            totals: dict[tuple[str, str, int, datetime | None], Counters] = {}
            for row in s.scalars(stmt.execution_options(yield_per=2000)):
                group = (row.key_id, row.model, row.version, _period(utc(row.minute), by))
                totals.setdefault(group, Counters()).add(_counters(row))
            return totals

        totals = self.db.read(read)
        order = sorted(totals, key=lambda g: (g[3] or datetime.min.replace(tzinfo=UTC), g[0], g[1], g[2]))
        return [UsageTotal(*group, **asdict(totals[group])) for group in order]

    def prune(self, before: datetime) -> int:
        """Delete the rows of minutes before ``before``; how many went."""
        result = self.db.write(lambda s: s.execute(delete(UsageRow).where(UsageRow.minute < minute_of(before))))
        return int(getattr(result, "rowcount", 0) or 0)


def _counters(row: UsageRow) -> Counters:
    return Counters(row.requests, row.errors, row.items, row.prompt_tokens, row.completion_tokens, float(row.compute_s))
