"""The limit store in the metadata database: a row per key, counter and window in ``limit_counters`` (``rpm:<second>``,
``tpm:<second>``, ``day:<UTC date>``, ``month:<UTC month>``) and a row per lease in ``limit_leases``.

An admission is one write transaction: SQLite runs write transactions one at a time (``BEGIN IMMEDIATE``), and on
PostgreSQL the transaction first takes an advisory lock on the key, so two processes never both see the last slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from maas.access.limits import (
    LEASE_TTL_S,
    WINDOW_S,
    Charge,
    Counts,
    day_of,
    month_of,
    next_day,
    next_month,
    passes,
    window_start,
)
from maas.access.principal import KeyLimits
from maas.registry.schema_access import LeaseRow, LimitCounterRow
from maas.registry.sql.engine import Database

_COUNTERS: Table = LimitCounterRow.__table__  # type: ignore[assignment]
#: Rows per statement of a multi-row upsert: within SQLite's bound on parameters per statement.
_CHUNK = 90
#: Calendar counters are kept this long past their window (a slow clock elsewhere still finds them).
_GRACE_S = 3600.0


def when(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def upsert_add(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], add: Sequence[str]
) -> None:
    """Insert ``rows`` into ``table``, or, where a row with the same ``keys`` exists, add their ``add`` columns to it
    (other columns take the new values). One ``INSERT … ON CONFLICT DO UPDATE`` per chunk, on SQLite and PostgreSQL.

    Rows go in the order of their keys: PostgreSQL locks them one by one, and two writers that lock the same rows in
    different orders deadlock (one of them is then rolled back after a second)."""
    if not rows:
        return
    rows = sorted(rows, key=lambda row: tuple(row[k] for k in keys))
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"counters need SQLite or PostgreSQL, not {dialect}")
    for start in range(0, len(rows), _CHUNK):
        stmt: Any = insert(table).values(list(rows[start : start + _CHUNK]))
        columns = {c: table.c[c] + stmt.excluded[c] for c in add}
        columns |= {c: stmt.excluded[c] for c in rows[0] if c not in add and c not in keys}
        session.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=columns))


def _counter(key_id: str, bucket: str, count: int, expires: float) -> dict[str, Any]:
    return {"key_id": key_id, "bucket": bucket, "count": count, "expires_at": when(expires)}


def _add(session: Session, rows: list[dict[str, Any]]) -> None:
    # One row per counter: a batch may name a counter twice, which one multi-row upsert may not.
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        seen = merged.get((row["key_id"], row["bucket"]))
        if seen is None:
            merged[(row["key_id"], row["bucket"])] = dict(row)
        else:
            seen["count"] += row["count"]
            seen["expires_at"] = max(seen["expires_at"], row["expires_at"])
    upsert_add(session, _COUNTERS, list(merged.values()), ("key_id", "bucket"), ("count",))


class SqlLimitStore:
    """See the module docstring."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def admit(self, key_id: str, limits: KeyLimits, lease: str | None, at: float) -> Counts:
        second = int(at)
        lo = window_start(at)
        day, month = f"day:{day_of(at)}", f"month:{month_of(at)}"
        C = LimitCounterRow

        def tx(s: Session) -> Counts:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"maas-limits:{key_id}"})
            wanted = []
            if limits.rpm is not None:
                wanted.append(C.bucket.between(f"rpm:{lo:010d}", "rpm:~"))
            if limits.tpm is not None:
                wanted.append(C.bucket.between(f"tpm:{lo:010d}", "tpm:~"))
            exact = [
                b for b, on in ((day, limits.requests_per_day), (month, limits.tokens_per_month)) if on is not None
            ]
            if exact:
                wanted.append(C.bucket.in_(exact))
            found = s.execute(select(C.bucket, C.count).where(C.key_id == key_id, or_(*wanted))).all() if wanted else []
            minute: dict[str, dict[int, int]] = {"rpm": {}, "tpm": {}}
            calendar: dict[str, int] = {}
            for bucket, count in found:
                kind, _, rest = bucket.partition(":")
                if kind in minute:
                    minute[kind][int(rest)] = int(count)
                else:
                    calendar[bucket] = int(count)
            leases = 0
            if limits.concurrent is not None:
                live = (LeaseRow.key_id == key_id, LeaseRow.expires_at > when(at))
                leases = int(s.scalar(select(func.count()).select_from(LeaseRow).where(*live)) or 0)
            counts = Counts(minute["rpm"], minute["tpm"], calendar.get(day, 0), calendar.get(month, 0), leases)
            if not passes(limits, counts):
                return counts
            rows = []
            if limits.rpm is not None:
                rows.append(_counter(key_id, f"rpm:{second:010d}", 1, second + WINDOW_S + 2))
            if limits.requests_per_day is not None:
                rows.append(_counter(key_id, day, 1, next_day(at) + _GRACE_S))
            _add(s, rows)
            if lease is not None and limits.concurrent is not None:
                s.add(LeaseRow(id=lease, key_id=key_id, expires_at=when(at + LEASE_TTL_S)))
            return replace(counts, admitted=True)

        return self.db.write(tx)

    def settle(self, charges: Sequence[Charge], releases: Sequence[tuple[str, str]]) -> None:
        rows = []
        for c in charges:
            if c.tokens <= 0:
                continue
            if c.minute:
                second = int(c.at)
                rows.append(_counter(c.key_id, f"tpm:{second:010d}", c.tokens, second + WINDOW_S + 2))
            if c.month:
                rows.append(_counter(c.key_id, f"month:{month_of(c.at)}", c.tokens, next_month(c.at) + _GRACE_S))
        ids = [lease for _, lease in releases]

        def tx(s: Session) -> None:
            _add(s, rows)
            if ids:
                s.execute(delete(LeaseRow).where(LeaseRow.id.in_(ids)))

        if rows or ids:
            self.db.write(tx)

    def renew(self, leases: Sequence[tuple[str, str]], at: float) -> None:
        ids = [lease for _, lease in leases]
        if ids:
            stmt = update(LeaseRow).where(LeaseRow.id.in_(ids)).values(expires_at=when(at + LEASE_TTL_S))
            self.db.write(lambda s: s.execute(stmt))

    def sweep(self, at: float) -> None:
        def tx(s: Session) -> None:
            s.execute(delete(LimitCounterRow).where(LimitCounterRow.expires_at < when(at)))
            s.execute(delete(LeaseRow).where(LeaseRow.expires_at < when(at)))

        self.db.write(tx)

    def close(self) -> None:
        pass
