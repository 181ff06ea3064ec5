"""Models, versions and aliases in SQL: every statement the registry makes about them."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from maas.errors import Conflict, NotFound
from maas.registry.audit import record
from maas.registry.entities import AliasEvent, Lineage, ModelVersion, RegisteredModel, ServingTarget
from maas.registry.schema import AliasEventRow, AliasRow, ModelRow, VersionRow
from maas.registry.sql.engine import Database, now
from maas.registry.sql.rows import aliases, model_row, move_alias, to_event, to_model, to_version, version_row
from maas.registry.store import MetadataStore
from maas.tensors import Signature


def _facts(mv: ModelVersion) -> dict[str, object]:
    return {"digest": mv.artifact_digest, "format": mv.format, "size": mv.artifact_size, "aliases": list(mv.aliases)}


def _record_alias(s: Session, action: str, event: AliasEvent, actor: str | None) -> AliasEvent:
    """Audit an alias move (``before``/``after``: the version it pointed at, None when absent)."""
    before = {"version": event.from_version} if event.from_version is not None else None
    after = {"version": event.to_version} if event.to_version is not None else None
    record(s, action, f"models:/{event.name}@{event.alias}", before=before, after=after, actor=actor)
    return event


class SqlModelStore(MetadataStore):
    """The model half of :class:`~maas.registry.sql.store.SqlStore`; each method one transaction of ``db``."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
        def tx(s: Session) -> ModelVersion:
            at = now()
            model = s.scalars(select(ModelRow).where(ModelRow.name == name).with_for_update()).first()
            if model is None:
                model = ModelRow(name=name, description="", last_version=0, created_at=at, updated_at=at)
                s.add(model)
                s.flush()  # a concurrent creator makes this raise IntegrityError: Database.write retries
            model.last_version += 1
            model.updated_at = at
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
                created_at=at,
            )
            s.add(row)
            s.flush()
            event = move_alias(s, model, alias, row.version, "set", lineage.creator) if alias is not None else None
            uri = f"models:/{name}/{row.version}"
            record(s, "model.register", uri, after={"digest": digest, "format": format, "size": size, "alias": alias})
            if event is not None:
                _record_alias(s, "alias.set", event, None)
            return to_version(model, row, aliases(s, model.id))

        return self.db.write(tx)

    def update_version(
        self,
        name: str,
        version: int,
        *,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ModelVersion:
        def tx(s: Session) -> ModelVersion:
            model = model_row(s, name, lock=True)  # a merge must see the one before it (PostgreSQL)
            row = version_row(s, model, version)
            before = {"description": row.description, "tags": dict(row.tags or {}), "metrics": dict(row.metrics or {})}
            if description is not None:
                row.description = description
            if tags:
                row.tags = {**row.tags, **tags}
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            after = {"description": row.description, "tags": dict(row.tags), "metrics": dict(row.metrics)}
            changed = [k for k in before if before[k] != after[k]]
            if changed:
                uri = f"models:/{name}/{version}"
                record(
                    s, "model.update", uri, before={k: before[k] for k in changed}, after={k: after[k] for k in changed}
                )
            return to_version(model, row, aliases(s, model.id))

        return self.db.write(tx)

    def list_models(self) -> list[RegisteredModel]:
        return self.db.read(lambda s: [to_model(s, m) for m in s.scalars(select(ModelRow).order_by(ModelRow.name))])

    def get_model(self, name: str) -> RegisteredModel:
        return self.db.read(lambda s: to_model(s, model_row(s, name)))

    def list_versions(self, name: str) -> list[ModelVersion]:
        def tx(s: Session) -> list[ModelVersion]:
            model = model_row(s, name)
            model_aliases = aliases(s, model.id)
            rows = s.scalars(select(VersionRow).where(VersionRow.model_id == model.id).order_by(VersionRow.version))
            return [to_version(model, r, model_aliases) for r in rows]

        return self.db.read(tx)

    def get_version(self, name: str, version: int) -> ModelVersion:
        def tx(s: Session) -> ModelVersion:
            model = model_row(s, name)
            return to_version(model, version_row(s, model, version), aliases(s, model.id))

        return self.db.read(tx)

    def latest_version(self, name: str) -> int | None:
        def tx(s: Session) -> int | None:
            model = model_row(s, name)
            return s.scalar(select(func.max(VersionRow.version)).where(VersionRow.model_id == model.id))

        return self.db.read(tx)

    def delete_version(self, name: str, version: int, *, force: bool, actor: str | None) -> tuple[ModelVersion, bool]:
        def tx(s: Session) -> tuple[ModelVersion, bool]:
            model = model_row(s, name, lock=True)
            row = version_row(s, model, version)
            model_aliases = aliases(s, model.id)
            pointing = sorted(a for a, v in model_aliases.items() if v == version)
            if pointing and not force:
                raise Conflict(
                    f"{name}/{version} is the target of alias(es) {', '.join(pointing)}; move them first "
                    f"(`maas models alias set {name} {pointing[0]} VERSION`) or pass --force to delete them too"
                )
            entity = to_version(model, row, model_aliases)
            events = [move_alias(s, model, a, None, "delete", actor) for a in pointing]
            s.delete(row)
            s.flush()
            still_used = (
                s.scalar(select(func.count(VersionRow.id)).where(VersionRow.artifact_digest == row.artifact_digest))
                or 0
            ) > 0
            for event in events:
                _record_alias(s, "alias.delete", event, actor)
            record(s, "model.delete_version", entity.uri, before=_facts(entity), actor=actor)
            return entity, still_used

        return self.db.write(tx)

    def delete_model(self, name: str) -> list[str]:
        def tx(s: Session) -> list[str]:
            model = model_row(s, name, lock=True)
            digests = set(s.scalars(select(VersionRow.artifact_digest).where(VersionRow.model_id == model.id)))
            versions = sorted(s.scalars(select(VersionRow.version).where(VersionRow.model_id == model.id)))
            before = {"versions": versions, "aliases": aliases(s, model.id)}
            for table in (AliasEventRow, AliasRow, VersionRow):
                s.execute(delete(table).where(table.model_id == model.id))
            s.delete(model)
            s.flush()
            used = set(s.scalars(select(VersionRow.artifact_digest).where(VersionRow.artifact_digest.in_(digests))))
            record(s, "model.delete", f"models:/{name}", before=before)
            return sorted(digests - used)

        return self.db.write(tx)

    # --- aliases -------------------------------------------------------------------------------

    def get_alias(self, name: str, alias: str) -> int | None:
        return self.db.read(lambda s: aliases(s, model_row(s, name).id).get(alias))

    def set_alias(self, name: str, alias: str, version: int, *, actor: str | None) -> AliasEvent:
        def tx(s: Session) -> AliasEvent:
            model = model_row(s, name, lock=True)
            version_row(s, model, version)
            return _record_alias(s, "alias.set", move_alias(s, model, alias, version, "set", actor), actor)

        return self.db.write(tx)

    def delete_alias(self, name: str, alias: str, *, actor: str | None) -> AliasEvent:
        def tx(s: Session) -> AliasEvent:
            model = model_row(s, name, lock=True)
            return _record_alias(s, "alias.delete", move_alias(s, model, alias, None, "delete", actor), actor)

        return self.db.write(tx)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        def tx(s: Session) -> list[AliasEvent]:
            model = model_row(s, name)
            q = select(AliasEventRow).where(AliasEventRow.model_id == model.id)
            if alias is not None:
                q = q.where(AliasEventRow.alias == alias)
            return [to_event(name, r) for r in s.scalars(q.order_by(AliasEventRow.id))]

        return self.db.read(tx)

    def rollback(self, name: str, alias: str, *, actor: str | None) -> AliasEvent:
        # The history is replayed as a stack: each set or delete pushes the version it replaced, each
        # rollback pops one, so repeated rollbacks keep walking back. Versions deleted since are skipped.
        def tx(s: Session) -> AliasEvent:
            model = model_row(s, name, lock=True)
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
            current = aliases(s, model.id).get(alias)
            while stack and (stack[-1] not in existing or stack[-1] == current):
                stack.pop()
            if not stack:
                if not events:
                    raise NotFound(f"model {name!r} has no alias {alias!r} to roll back")
                raise Conflict(f"alias {alias!r} of {name!r} has no earlier version to roll back to")
            event = move_alias(s, model, alias, stack[-1], "rollback", actor)
            return _record_alias(s, "alias.rollback", event, actor)

        return self.db.write(tx)

    # --- serving and garbage collection --------------------------------------------------------

    def serving_targets(self, default_alias: str) -> list[ServingTarget]:
        def tx(s: Session) -> list[ServingTarget]:
            latest = dict(
                s.execute(
                    select(ModelRow.name, func.max(VersionRow.version))
                    .join(VersionRow, VersionRow.model_id == ModelRow.id, isouter=True)
                    .group_by(ModelRow.name)
                ).all()
            )
            by_model: dict[str, dict[str, int]] = {}
            for name, alias, version in s.execute(
                select(ModelRow.name, AliasRow.alias, AliasRow.version).join(AliasRow, AliasRow.model_id == ModelRow.id)
            ):
                by_model.setdefault(name, {})[alias] = version
            return [
                ServingTarget(name=n, version=by_model.get(n, {}).get(default_alias, v), aliases=by_model.get(n, {}))
                for n, v in sorted(latest.items())
            ]

        return self.db.read(tx)

    def version_digests(self) -> dict[tuple[str, int], str]:
        def tx(s: Session) -> dict[tuple[str, int], str]:
            rows = s.execute(
                select(ModelRow.name, VersionRow.version, VersionRow.artifact_digest).join(
                    VersionRow, VersionRow.model_id == ModelRow.id
                )
            )
            return {(n, v): d for n, v, d in rows}

        return self.db.read(tx)

    def referenced_digests(self) -> set[str]:
        return self.db.read(lambda s: set(s.scalars(select(VersionRow.artifact_digest).distinct())))

    def digest_in_use(self, digest: str) -> bool:
        """Whether any version's artifact has ``digest``."""
        return self.db.read(
            lambda s: (s.scalar(select(func.count(VersionRow.id)).where(VersionRow.artifact_digest == digest)) or 0) > 0
        )
