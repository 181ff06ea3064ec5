"""The access settings a server starts with, in the audit log: a change of auth mode or TLS at an address is a
mutation like any other, recorded once per change (not once per start)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from maas.registry.audit import record
from maas.registry.schema_access import AuditRow
from maas.registry.sql.engine import Database

ACTION = "auth.settings"


def record_server_settings(db: Database, address: str, settings: dict[str, Any]) -> bool:
    """Append ``settings`` for the server at ``address`` unless they equal the last ones recorded there; whether
    they were appended."""
    target = f"server:{address}"

    def tx(s: Session) -> bool:
        last = s.execute(
            select(AuditRow.after)
            .where(AuditRow.action == ACTION, AuditRow.target == target)
            .order_by(AuditRow.seq.desc())
            .limit(1)
        ).scalar()
        if last == settings:
            return False
        record(s, ACTION, target, before=last, after=settings)
        return True

    return db.write(tx)
