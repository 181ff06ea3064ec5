"""One SQL database: its engine, its schema migrations, and the transactions every statement runs in.

SQLite (the embedded default) runs in WAL mode with a busy timeout; write transactions start with
``BEGIN IMMEDIATE`` so concurrent writers queue on the database lock instead of failing half-way.
PostgreSQL (``MAAS_DATABASE_URL``, driven by psycopg 3; a bare ``postgresql://`` URL gets it too) locks the rows a
transaction changes from what it read, and the audit log and the limit counters take advisory locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: The newest Alembic revision; a test keeps it equal to the migrations' head.
SCHEMA_HEAD = "0005_access"

T = TypeVar("T")


def utc(dt: datetime) -> datetime:
    """``dt`` as an aware UTC datetime: SQLite hands back naive ones (stored as UTC), PostgreSQL aware ones in the
    session's time zone, which truncating to an hour or a day must not see."""
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, busy_timeout_s: float) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself (the driver's implicit BEGIN is deferred).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            write = conn.get_execution_options().get("maas_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):  # SQLAlchemy would pick psycopg2, which maas does not install
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


#: PostgreSQL's SQLSTATEs of a transaction it rolled back for another's sake: serialization failure, deadlock.
_PG_RETRY = {"40001", "40P01"}


def _retryable(exc: OperationalError | IntegrityError) -> bool:
    """Whether running the transaction again may succeed: a creation race (a unique key taken meanwhile), SQLite's
    busy timeout running out, or PostgreSQL rolling it back to end a deadlock or a serialization conflict."""
    if isinstance(exc, IntegrityError):
        return True
    code = getattr(exc.orig, "sqlstate", None)
    if code is not None:  # PostgreSQL (psycopg)
        return code in _PG_RETRY
    return "locked" in str(exc.orig).lower()  # SQLite: "database is locked", "database table is locked"


class Database:
    """A SQL database at ``url``, its schema brought to :data:`SCHEMA_HEAD` on opening."""

    def __init__(self, url: str, *, busy_timeout_s: float = 60.0) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_s)
        self._write_engine = self.engine.execution_options(maas_write=True)
        self._is_sqlite = url.startswith("sqlite")
        self.upgrade_schema()

    # --- schema --------------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except OperationalError:
                return None
            except Exception:  # e.g. ProgrammingError on PostgreSQL when the table is absent
                return None

    def upgrade_schema(self) -> None:
        """Bring the schema to :data:`SCHEMA_HEAD`, once, even when several processes start together."""
        if self.current_revision() == SCHEMA_HEAD:
            return
        with self._migration_lock():
            if self.current_revision() == SCHEMA_HEAD:
                return
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", "maas.registry:migrations")
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            log.info("registry schema upgraded to %s", SCHEMA_HEAD)

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self._is_sqlite and self.engine.url.database and self.engine.url.database != ":memory:":
            lock_path = Path(self.engine.url.database).with_suffix(".migrate.lock")
            with lock_path.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        elif self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(7201002)"))
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(7201002)"))
        else:
            yield

    # --- transactions --------------------------------------------------------------------------

    def read(self, fn: Callable[[Session], T]) -> T:
        """``fn`` in a read transaction."""
        with Session(self.engine) as s, s.begin():
            return fn(s)

    def write(self, fn: Callable[[Session], T]) -> T:
        """``fn`` in a write transaction, retried on the rare lock timeouts and creation races, so it must
        not change anything outside the session."""
        attempts = 8
        for attempt in range(attempts):
            try:
                with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except (OperationalError, IntegrityError) as exc:
                if not _retryable(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")
