"""The SQL metadata store: engines, schema migrations, and every query the registry makes.

SQLite (the embedded default) runs in WAL mode with a busy timeout; write transactions start with
``BEGIN IMMEDIATE`` so concurrent writers queue on the database lock instead of failing half-way.
PostgreSQL (``MAAS_DATABASE_URL``) locks the model row instead. ORM rows never leave this module.
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

from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from maas.errors import Conflict, NotFound
from maas.registry.entities import AliasEvent, Lineage, ModelVersion, RegisteredModel, ServingTarget
from maas.registry.schema import AliasEventRow, AliasRow, ModelRow, VersionRow
from maas.tensors import Signature

log = logging.getLogger(__name__)

#: The newest Alembic revision; a test keeps it equal to the migrations' head.
SCHEMA_HEAD = "0003_run_evals"

T = TypeVar("T")


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _make_engine(url: str, busy_timeout_s: float) -> Engine:
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
    return create_engine(url, pool_pre_ping=True)


class SqlStore:
    """All registry metadata reads and writes, each in one transaction."""

    def __init__(self, url: str, *, busy_timeout_s: float = 60.0) -> None:
        self.url = url
        self.engine = _make_engine(url, busy_timeout_s)
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

    def _read(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine) as s, s.begin():
            return fn(s)

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a write transaction, retrying the rare lock timeouts and creation races."""
        attempts = 8
        for attempt in range(attempts):
            try:
                with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except (OperationalError, IntegrityError) as exc:
                retryable = isinstance(exc, IntegrityError) or "locked" in str(exc).lower()
                if not retryable or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _model_row(s: Session, name: str, *, lock: bool = False) -> ModelRow:
        q = select(ModelRow).where(ModelRow.name == name)
        if lock:
            q = q.with_for_update()
        row = s.scalars(q).first()
        if row is None:
            raise NotFound(f"model {name!r} is not registered; see `maas models list`")
        return row

    @staticmethod
    def _aliases(s: Session, model_id: int) -> dict[str, int]:
        rows = s.execute(select(AliasRow.alias, AliasRow.version).where(AliasRow.model_id == model_id))
        return {a: v for a, v in rows}

    @staticmethod
    def _version_row(s: Session, model: ModelRow, version: int) -> VersionRow:
        row = s.scalars(
            select(VersionRow).where(VersionRow.model_id == model.id, VersionRow.version == version)
        ).first()
        if row is None:
            raise NotFound(f"model {model.name!r} has no version {version}; see `maas models show {model.name}`")
        return row

    @staticmethod
    def _to_version(model: ModelRow, row: VersionRow, aliases: dict[str, int]) -> ModelVersion:
        return ModelVersion(
            name=model.name,
            version=row.version,
            format=row.format,
            signature=Signature.from_dict(row.signature),
            artifact_digest=row.artifact_digest,
            artifact_size=row.artifact_size,
            created_at=_utc(row.created_at),
            description=row.description,
            tags=dict(row.tags or {}),
            metrics=dict(row.metrics or {}),
            lineage=Lineage(
                parent=row.parent, source_run=row.source_run, creator=row.creator, extra=dict(row.lineage_extra or {})
            ),
            aliases=tuple(sorted(a for a, v in aliases.items() if v == row.version)),
        )

    def _to_model(self, s: Session, row: ModelRow) -> RegisteredModel:
        latest, count = s.execute(
            select(func.max(VersionRow.version), func.count(VersionRow.id)).where(VersionRow.model_id == row.id)
        ).one()
        return RegisteredModel(
            name=row.name,
            created_at=_utc(row.created_at),
            updated_at=_utc(row.updated_at),
            description=row.description,
            aliases=self._aliases(s, row.id),
            latest_version=latest,
            version_count=count,
        )

    @staticmethod
    def _event(name: str, row: AliasEventRow) -> AliasEvent:
        return AliasEvent(
            name=name,
            alias=row.alias,
            action=row.action,
            from_version=row.from_version,
            to_version=row.to_version,
            actor=row.actor,
            at=_utc(row.at),
        )

    def _move_alias(
        self, s: Session, model: ModelRow, alias: str, to_version: int | None, action: str, actor: str | None
    ) -> AliasEvent:
        current = s.scalars(select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.alias == alias)).first()
        from_version = current.version if current else None
        if to_version is None:
            if current is None:
                raise NotFound(f"model {model.name!r} has no alias {alias!r}")
            s.delete(current)
        elif current is None:
            s.add(AliasRow(model_id=model.id, alias=alias, version=to_version))
        else:
            current.version = to_version
        now = _now()
        ev = AliasEventRow(
            model_id=model.id,
            alias=alias,
            action=action,
            from_version=from_version,
            to_version=to_version,
            actor=actor,
            at=now,
        )
        s.add(ev)
        model.updated_at = now
        s.flush()
        return self._event(model.name, ev)

    # --- models and versions -------------------------------------------------------------------

    def create_version(
        self,
        name: str,
        *,
        format: str,
        signature: Signature,
        digest: str,
        size: int,
        description: str,
        tags: dict[str, str],
        metrics: dict[str, float],
        lineage: Lineage,
        alias: str | None,
    ) -> ModelVersion:
        """Add the next version of ``name`` (creating the model if new), optionally pointing ``alias`` at it."""

        def tx(s: Session) -> ModelVersion:
            now = _now()
            model = s.scalars(select(ModelRow).where(ModelRow.name == name).with_for_update()).first()
            if model is None:
                model = ModelRow(name=name, description="", last_version=0, created_at=now, updated_at=now)
                s.add(model)
                s.flush()  # a concurrent creator makes this raise IntegrityError: _write retries
            model.last_version += 1
            model.updated_at = now
            row = VersionRow(
                model_id=model.id,
                version=model.last_version,
                format=format,
                signature=signature.to_dict(),
                description=description,
                tags=tags,
                metrics=metrics,
                parent=lineage.parent,
                source_run=lineage.source_run,
                creator=lineage.creator,
                lineage_extra=lineage.extra,
                artifact_digest=digest,
                artifact_size=size,
                created_at=now,
            )
            s.add(row)
            s.flush()
            if alias is not None:
                self._move_alias(s, model, alias, row.version, "set", lineage.creator)
            return self._to_version(model, row, self._aliases(s, model.id))

        return self._write(tx)

    def update_version(
        self,
        name: str,
        version: int,
        *,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ModelVersion:
        """Change a version's description, or merge into its tags and metrics. The artifact never changes."""

        def tx(s: Session) -> ModelVersion:
            model = self._model_row(s, name)
            row = self._version_row(s, model, version)
            if description is not None:
                row.description = description
            if tags:
                row.tags = {**row.tags, **tags}
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            return self._to_version(model, row, self._aliases(s, model.id))

        return self._write(tx)

    def list_models(self) -> list[RegisteredModel]:
        return self._read(lambda s: [self._to_model(s, m) for m in s.scalars(select(ModelRow).order_by(ModelRow.name))])

    def get_model(self, name: str) -> RegisteredModel:
        return self._read(lambda s: self._to_model(s, self._model_row(s, name)))

    def list_versions(self, name: str) -> list[ModelVersion]:
        def tx(s: Session) -> list[ModelVersion]:
            model = self._model_row(s, name)
            aliases = self._aliases(s, model.id)
            rows = s.scalars(select(VersionRow).where(VersionRow.model_id == model.id).order_by(VersionRow.version))
            return [self._to_version(model, r, aliases) for r in rows]

        return self._read(tx)

    def get_version(self, name: str, version: int) -> ModelVersion:
        def tx(s: Session) -> ModelVersion:
            model = self._model_row(s, name)
            return self._to_version(model, self._version_row(s, model, version), self._aliases(s, model.id))

        return self._read(tx)

    def latest_version(self, name: str) -> int | None:
        def tx(s: Session) -> int | None:
            model = self._model_row(s, name)
            return s.scalar(select(func.max(VersionRow.version)).where(VersionRow.model_id == model.id))

        return self._read(tx)

    def get_alias(self, name: str, alias: str) -> int | None:
        return self._read(lambda s: self._aliases(s, self._model_row(s, name).id).get(alias))

    def delete_version(self, name: str, version: int, *, force: bool, actor: str | None) -> tuple[ModelVersion, bool]:
        """Delete a version; returns it and whether its artifact is still used by another version."""

        def tx(s: Session) -> tuple[ModelVersion, bool]:
            model = self._model_row(s, name, lock=True)
            row = self._version_row(s, model, version)
            aliases = self._aliases(s, model.id)
            pointing = sorted(a for a, v in aliases.items() if v == version)
            if pointing and not force:
                raise Conflict(
                    f"{name}/{version} is the target of alias(es) {', '.join(pointing)}; move them first "
                    f"(`maas models alias set {name} {pointing[0]} VERSION`) or pass --force to delete them too"
                )
            entity = self._to_version(model, row, aliases)
            for a in pointing:
                self._move_alias(s, model, a, None, "delete", actor)
            s.delete(row)
            s.flush()
            still_used = (
                s.scalar(select(func.count(VersionRow.id)).where(VersionRow.artifact_digest == row.artifact_digest))
                or 0
            ) > 0
            return entity, still_used

        return self._write(tx)

    # --- aliases -------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int, *, actor: str | None) -> AliasEvent:
        def tx(s: Session) -> AliasEvent:
            model = self._model_row(s, name, lock=True)
            self._version_row(s, model, version)
            return self._move_alias(s, model, alias, version, "set", actor)

        return self._write(tx)

    def delete_alias(self, name: str, alias: str, *, actor: str | None) -> AliasEvent:
        def tx(s: Session) -> AliasEvent:
            model = self._model_row(s, name, lock=True)
            return self._move_alias(s, model, alias, None, "delete", actor)

        return self._write(tx)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        def tx(s: Session) -> list[AliasEvent]:
            model = self._model_row(s, name)
            q = select(AliasEventRow).where(AliasEventRow.model_id == model.id)
            if alias is not None:
                q = q.where(AliasEventRow.alias == alias)
            return [self._event(name, r) for r in s.scalars(q.order_by(AliasEventRow.id))]

        return self._read(tx)

    def rollback(self, name: str, alias: str, *, actor: str | None) -> AliasEvent:
        """Point ``alias`` back at the version it held before its last move.

        The history is replayed as a stack: each set or delete pushes the version it replaced, each
        rollback pops one, so repeated rollbacks keep walking back. Versions deleted since are skipped.
        """

        def tx(s: Session) -> AliasEvent:
            model = self._model_row(s, name, lock=True)
            events = s.scalars(
                select(AliasEventRow)
                .where(AliasEventRow.model_id == model.id, AliasEventRow.alias == alias)
                .order_by(AliasEventRow.id)
            ).all()
            stack: list[int] = []
            for ev in events:
                if ev.action == "rollback":
                    if stack:
                        stack.pop()
                elif ev.from_version is not None:
                    stack.append(ev.from_version)
            existing = set(s.scalars(select(VersionRow.version).where(VersionRow.model_id == model.id)))
            current = self._aliases(s, model.id).get(alias)
            while stack and (stack[-1] not in existing or stack[-1] == current):
                stack.pop()
            if not stack:
                if not events:
                    raise NotFound(f"model {name!r} has no alias {alias!r} to roll back")
                raise Conflict(f"alias {alias!r} of {name!r} has no earlier version to roll back to")
            return self._move_alias(s, model, alias, stack[-1], "rollback", actor)

        return self._write(tx)

    # --- serving -------------------------------------------------------------------------------

    def serving_targets(self, default_alias: str) -> list[ServingTarget]:
        """For every model: its aliases, and the version a bare name means (``default_alias``, else latest)."""

        def tx(s: Session) -> list[ServingTarget]:
            latest = dict(
                s.execute(
                    select(ModelRow.name, func.max(VersionRow.version))
                    .join(VersionRow, VersionRow.model_id == ModelRow.id, isouter=True)
                    .group_by(ModelRow.name)
                ).all()
            )
            aliases: dict[str, dict[str, int]] = {}
            for name, alias, version in s.execute(
                select(ModelRow.name, AliasRow.alias, AliasRow.version).join(AliasRow, AliasRow.model_id == ModelRow.id)
            ):
                aliases.setdefault(name, {})[alias] = version
            return [
                ServingTarget(name=n, version=aliases.get(n, {}).get(default_alias, v), aliases=aliases.get(n, {}))
                for n, v in sorted(latest.items())
            ]

        return self._read(tx)

    def version_digests(self) -> dict[tuple[str, int], str]:
        """Every existing (name, version) with its artifact digest."""

        def tx(s: Session) -> dict[tuple[str, int], str]:
            rows = s.execute(
                select(ModelRow.name, VersionRow.version, VersionRow.artifact_digest).join(
                    VersionRow, VersionRow.model_id == ModelRow.id
                )
            )
            return {(n, v): d for n, v, d in rows}

        return self._read(tx)

    def referenced_digests(self) -> set[str]:
        """The artifact digest of every version of every model."""
        return self._read(lambda s: set(s.scalars(select(VersionRow.artifact_digest).distinct())))

    def digest_in_use(self, digest: str) -> bool:
        return self._read(
            lambda s: (s.scalar(select(func.count(VersionRow.id)).where(VersionRow.artifact_digest == digest)) or 0) > 0
        )

    def delete_model(self, name: str) -> list[str]:
        """Delete a model with all its versions and history; returns the digests no longer used."""

        def tx(s: Session) -> list[str]:
            model = self._model_row(s, name, lock=True)
            digests = set(s.scalars(select(VersionRow.artifact_digest).where(VersionRow.model_id == model.id)))
            for table in (AliasEventRow, AliasRow, VersionRow):
                s.execute(delete(table).where(table.model_id == model.id))
            s.delete(model)
            s.flush()
            used = set(s.scalars(select(VersionRow.artifact_digest).where(VersionRow.artifact_digest.in_(digests))))
            return sorted(digests - used)

        return self._write(tx)
