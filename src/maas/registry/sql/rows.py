"""Row lookups, row -> entity conversions and the alias move that the model statements share."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from maas.errors import NotFound
from maas.registry.entities import AliasEvent, Lineage, ModelVersion, RegisteredModel
from maas.registry.schema import AliasEventRow, AliasRow, ModelRow, VersionRow
from maas.registry.sql.engine import now, utc
from maas.tensors import Signature


def model_row(s: Session, name: str, *, lock: bool = False) -> ModelRow:
    q = select(ModelRow).where(ModelRow.name == name)
    if lock:
        q = q.with_for_update()
    row = s.scalars(q).first()
    if row is None:
        raise NotFound(f"model {name!r} is not registered; see `maas models list`")
    return row


def aliases(s: Session, model_id: int) -> dict[str, int]:
    rows = s.execute(select(AliasRow.alias, AliasRow.version).where(AliasRow.model_id == model_id))
    return {a: v for a, v in rows}


def version_row(s: Session, model: ModelRow, version: int) -> VersionRow:
    row = s.scalars(select(VersionRow).where(VersionRow.model_id == model.id, VersionRow.version == version)).first()
    if row is None:
        raise NotFound(f"model {model.name!r} has no version {version}; see `maas models show {model.name}`")
    return row


def to_version(model: ModelRow, row: VersionRow, model_aliases: dict[str, int]) -> ModelVersion:
    return ModelVersion(
        name=model.name,
        version=row.version,
        format=row.format,
        signature=Signature.from_dict(row.signature),
        artifact_digest=row.artifact_digest,
        artifact_size=row.artifact_size,
        created_at=utc(row.created_at),
        description=row.description,
        tags=dict(row.tags or {}),
        metrics=dict(row.metrics or {}),
        lineage=Lineage(
            parent=row.parent, source_run=row.source_run, creator=row.creator, extra=dict(row.lineage_extra or {})
        ),
        aliases=tuple(sorted(a for a, v in model_aliases.items() if v == row.version)),
    )


def to_model(s: Session, row: ModelRow) -> RegisteredModel:
    latest, count = s.execute(
        select(func.max(VersionRow.version), func.count(VersionRow.id)).where(VersionRow.model_id == row.id)
    ).one()
    return RegisteredModel(
        name=row.name,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        description=row.description,
        aliases=aliases(s, row.id),
        latest_version=latest,
        version_count=count,
    )


def to_event(name: str, row: AliasEventRow) -> AliasEvent:
    return AliasEvent(
        name=name,
        alias=row.alias,
        action=row.action,
        from_version=row.from_version,
        to_version=row.to_version,
        actor=row.actor,
        at=utc(row.at),
    )


def move_alias(
    s: Session, model: ModelRow, alias: str, to_version: int | None, action: str, actor: str | None
) -> AliasEvent:
    """Point ``alias`` at ``to_version`` (None deletes it) and record the move in its history."""
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
    at = now()
    ev = AliasEventRow(
        model_id=model.id,
        alias=alias,
        action=action,
        from_version=from_version,
        to_version=to_version,
        actor=actor,
        at=at,
    )
    s.add(ev)
    model.updated_at = at
    s.flush()
    return to_event(model.name, ev)
