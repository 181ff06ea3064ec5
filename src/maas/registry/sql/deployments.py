"""Deployments in SQL: one row per model that was ever deployed, keyed by the model and deleted with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from maas.registry.audit import record
from maas.registry.deployments import SETTINGS, merge_deployment
from maas.registry.entities import Deployment
from maas.registry.schema import DeploymentRow, ModelRow
from maas.registry.sql.engine import Database, now, utc
from maas.registry.sql.rows import model_row


def _to_deployment(name: str, row: DeploymentRow) -> Deployment:
    return Deployment(
        name=name,
        max_batch_size=row.max_batch_size,
        max_queue_delay_ms=row.max_queue_delay_ms,
        preferred_batch_sizes=tuple(row.preferred_batch_sizes),
        max_queue_size=row.max_queue_size,
        instances=row.instances,
        threads=row.threads,
        revision=row.revision,
        updated_at=utc(row.updated_at),
    )


def _settings(d: Deployment) -> dict[str, Any]:
    return {setting: getattr(d, setting) for setting in SETTINGS}


class SqlDeploymentStore:
    """The deployment methods of :class:`~maas.registry.sql.store.SqlStore`; each one transaction of ``db``.

    A write locks the model's row (SQLite: the database) first, so revisions count up one at a time.
    """

    db: Database

    def put_deployment(self, name: str, values: Mapping[str, Any]) -> Deployment:
        def tx(s: Session) -> Deployment:
            model = model_row(s, name, lock=True)
            row = s.get(DeploymentRow, model.id, with_for_update=True)
            current = _to_deployment(name, row) if row is not None and row.active else Deployment(name)
            merged = merge_deployment(current, values)
            if row is not None and row.active and _settings(merged) == _settings(current):
                return current
            if row is None:
                row = DeploymentRow(model_id=model.id, revision=0)
                s.add(row)
            for setting, value in _settings(merged).items():
                setattr(row, setting, list(value) if setting == "preferred_batch_sizes" else value)
            row.active = True
            row.revision += 1
            row.updated_at = now()
            s.flush()
            was = {**_settings(current), "revision": current.revision} if current.revision else None
            record(
                s,
                "deployment.put",
                f"models:/{name}",
                before=was,
                after={**_settings(merged), "revision": row.revision},
            )
            return _to_deployment(name, row)

        return self.db.write(tx)

    def get_deployment(self, name: str) -> Deployment | None:
        def tx(s: Session) -> Deployment | None:
            row = s.get(DeploymentRow, model_row(s, name).id)
            return _to_deployment(name, row) if row is not None and row.active else None

        return self.db.read(tx)

    def list_deployments(self) -> list[Deployment]:
        def tx(s: Session) -> list[Deployment]:
            rows = s.execute(
                select(ModelRow.name, DeploymentRow)
                .join(DeploymentRow, DeploymentRow.model_id == ModelRow.id)
                .where(DeploymentRow.active)
                .order_by(ModelRow.name)
            )
            return [_to_deployment(name, row) for name, row in rows]

        return self.db.read(tx)

    def delete_deployment(self, name: str) -> bool:
        def tx(s: Session) -> bool:
            model = model_row(s, name, lock=True)
            row = s.get(DeploymentRow, model.id, with_for_update=True)
            if row is None or not row.active:
                return False
            current = _to_deployment(name, row)
            defaults = Deployment(name)
            for setting, value in _settings(defaults).items():
                setattr(row, setting, list(value) if setting == "preferred_batch_sizes" else value)
            row.active = False
            row.revision += 1  # kept, so the next deployment gets a revision no server has seen
            row.updated_at = now()
            record(
                s, "deployment.delete", f"models:/{name}", before={**_settings(current), "revision": current.revision}
            )
            return True

        return self.db.write(tx)
