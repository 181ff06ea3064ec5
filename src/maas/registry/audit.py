"""The audit log: every mutation of the registry's database, appended in the mutation's own transaction and
hash-chained, so that an edited, deleted or reordered entry is found by :meth:`AuditLog.verify`.

Each entry's ``hash`` is sha256 over its canonical JSON form (seq, time, actor, action, target, before, after,
request id, client) and the previous entry's ``hash`` (64 zeros for the first). A chain alone cannot tell that
its *newest* entries were deleted, nor catch someone who rewrites every hash after an edit (there is no secret):
pin the head that ``maas audit verify`` prints somewhere the database's writers cannot reach, and check it later
with ``maas audit verify --expect-head HASH``.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from maas import envs
from maas.registry.schema_access import AuditRow
from maas.registry.sql.engine import Database, now, utc

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64
#: PostgreSQL advisory lock key that serialises appends (SQLite's BEGIN IMMEDIATE already does).
_PG_LOCK = 7201005


# --- who is acting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditContext:
    """Who causes the mutations made while it is current: a key id (server) or a local user (CLI)."""

    actor: str | None = None
    request_id: str | None = None
    client: str | None = None


_CONTEXT: ContextVar[AuditContext | None] = ContextVar("maas_audit_context", default=None)


def local_actor() -> str | None:
    """``MAAS_USER``, else the operating-system user: the actor of the local CLI."""
    if envs.MAAS_USER:
        return str(envs.MAAS_USER)
    try:
        return getpass.getuser()
    except Exception:
        return None


@contextlib.contextmanager
def audit_context(ctx: AuditContext) -> Iterator[AuditContext]:
    """Make ``ctx`` the audit context of this thread or task while the block runs."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def current_audit_context() -> AuditContext:
    """The context set by :func:`audit_context`; else the local actor with no request id or client."""
    ctx = _CONTEXT.get()
    return ctx if ctx is not None else AuditContext(actor=local_actor())


# --- entities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str | None
    action: str  # e.g. "model.register", "alias.set", "deployment.put"
    target: str  # e.g. "models:/NAME/VERSION", "models:/NAME@ALIAS"
    before: Any
    after: Any
    request_id: str | None
    client: str | None
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "request_id": self.request_id,
            "client": self.client,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class AuditProblem:
    """One break in the chain. ``kind``: edited, missing, link or head; ``seq`` None only for head."""

    seq: int | None
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class AuditVerifyResult:
    rows: int
    head_seq: int | None  # the newest entry; None when the log is empty
    head_hash: str  # its hash (GENESIS when empty): pin it to detect later deletion of the newest entries
    problems: tuple[AuditProblem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "problems": [p.to_dict() for p in self.problems],
        }


# --- the canonical form ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data that reads back from any database as it went in."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the value visible rather than fail the mutation
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, datetime):
        return _iso(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _iso(at: datetime) -> str:
    return utc(at).astimezone(UTC).isoformat(timespec="microseconds")


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(
    *,
    seq: int,
    at: datetime,
    actor: str | None,
    action: str,
    target: str,
    before: Any,
    after: Any,
    request_id: str | None,
    client: str | None,
    prev_hash: str,
) -> str:
    """The hash an entry with these fields must carry."""
    body = {
        "seq": seq,
        "at": _iso(at),
        "actor": actor,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
        "request_id": request_id,
        "client": client,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _row_hash(row: AuditRow) -> str:
    return entry_hash(
        seq=row.seq,
        at=row.at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        before=row.before,
        after=row.after,
        request_id=row.request_id,
        client=row.client,
        prev_hash=row.prev_hash,
    )


def _clip(value: str | None, size: int) -> str | None:
    return value[:size] if value is not None else None


# --- appending ---------------------------------------------------------------------------------


def record(
    session: Session, action: str, target: str, *, before: Any = None, after: Any = None, actor: str | None = None
) -> None:
    """Append one entry inside the caller's write transaction (call it last there: on PostgreSQL it takes a lock
    every appender waits for until commit).

    The actor is the current :class:`AuditContext`'s when one was set (a server's authenticated key wins over a
    name the caller claims); else ``actor``; else the local user.
    """
    ctx = _CONTEXT.get()
    who = ctx.actor if ctx is not None and ctx.actor else actor or current_audit_context().actor
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
    last = session.execute(select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)).first()
    seq, prev = (last[0] + 1, last[1]) if last is not None else (1, GENESIS)
    fields_ = {
        "seq": seq,
        "at": now(),
        "actor": _clip(who, 128),
        "action": action[:64],
        "target": target[:256],
        "before": _plain(before),
        "after": _plain(after),
        "request_id": _clip(ctx.request_id if ctx else None, 64),
        "client": _clip(ctx.client if ctx else None, 128),
        "prev_hash": prev,
    }
    session.add(AuditRow(**fields_, hash=entry_hash(**fields_)))
    # A concurrent appender that took the same seq makes this raise IntegrityError: Database.write retries.
    session.flush()


# --- reading and checking ----------------------------------------------------------------------


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        seq=row.seq,
        at=utc(row.at).astimezone(UTC),
        actor=row.actor,
        action=row.action,
        target=row.target,
        before=row.before,
        after=row.after,
        request_id=row.request_id,
        client=row.client,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _missing(first: int, last: int) -> AuditProblem:
    which = f"seq {first}" if first == last else f"seq {first}..{last}"
    return AuditProblem(first, "missing", f"{which}: missing (deleted)")


class AuditLog:
    """The audit log kept in ``db``; entries are appended by :func:`record`, never through this class."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def list(self, *, since: datetime | None = None, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` entries at or after ``since`` by ``actor`` (each when None), oldest first."""

        def tx(s: Session) -> list[AuditEntry]:
            q = select(AuditRow)
            if since is not None:
                q = q.where(AuditRow.at >= utc(since).astimezone(UTC))
            if actor is not None:
                q = q.where(AuditRow.actor == actor)
            rows = s.scalars(q.order_by(AuditRow.seq.desc()).limit(limit)).all()
            return [_entry(r) for r in reversed(rows)]

        return self.db.read(tx)

    def verify(self, *, expect_head: str | None = None) -> AuditVerifyResult:
        """Walk the chain in seq order and name every entry whose contents do not match its hash (edited), every
        gap in seq (deleted) and every ``prev_hash`` that is not the previous entry's hash (reordered, replaced or
        spliced). With ``expect_head`` (a hash printed by an earlier verify) also check that that entry is still
        there, which finds the deletion of the newest entries."""

        def tx(s: Session) -> AuditVerifyResult:
            problems: list[AuditProblem] = []
            rows, expected_seq, prev_hash = 0, 1, GENESIS
            head_seq: int | None = None
            found_head = False
            want = expect_head.strip().lower() if expect_head else None
            for row in s.scalars(select(AuditRow).order_by(AuditRow.seq).execution_options(yield_per=1000)):
                rows += 1
                if row.seq > expected_seq:
                    problems.append(_missing(expected_seq, row.seq - 1))
                if _row_hash(row) != row.hash:
                    problems.append(
                        AuditProblem(row.seq, "edited", f"seq {row.seq}: contents do not match its hash (edited)")
                    )
                if row.prev_hash != prev_hash and row.seq == expected_seq:
                    before = f"seq {row.seq - 1}'s hash" if row.seq > 1 else "the genesis hash"
                    problems.append(
                        AuditProblem(
                            row.seq,
                            "link",
                            f"seq {row.seq}: prev_hash is not {before}: entries were reordered, or the one before "
                            "it was replaced or re-hashed",
                        )
                    )
                found_head = found_head or row.hash == want
                expected_seq, prev_hash, head_seq = row.seq + 1, row.hash, row.seq
            if want is not None and not found_head:
                end = f"seq {head_seq}" if head_seq is not None else "no entry (it is empty)"
                problems.append(
                    AuditProblem(
                        None,
                        "head",
                        f"the expected head {want} is not in the log, which now ends at {end}: the newest entries "
                        "were deleted, or the chain was rewritten",
                    )
                )
            return AuditVerifyResult(rows, head_seq, prev_hash, tuple(problems))

        return self.db.read(tx)
