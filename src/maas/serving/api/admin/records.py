"""Admin API handlers for what was done: the audit log (admin keys only) and usage (an admin: every key's; any
other key: its own)."""

from __future__ import annotations

from fastapi import Query, Request, Response

from maas.access.keys import database_of
from maas.access.times import parse_since
from maas.access.usage import PERIODS, UsageStore
from maas.errors import Forbidden
from maas.registry.audit import AuditLog
from maas.serving.access.context import current_principal
from maas.serving.api.admin.policy import admin_only, json_response, registry, run
from maas.serving.api.admin.protocol import moment

MAX_ENTRIES = 10_000
_TIME = "ISO 8601 time (UTC when it names no zone), or a duration before now: 30m, 1h, 7d."


def _log(request: Request) -> AuditLog:
    admin_only("the audit log")
    return AuditLog(database_of(registry(request)))


async def list_audit(
    request: Request,
    since: str | None = Query(None, max_length=64, description=_TIME),
    actor: str | None = Query(None, max_length=128, description="Only this actor (key:ID, or a user)."),
    limit: int = Query(100, ge=1, le=MAX_ENTRIES),
) -> Response:
    """The newest ``limit`` entries, oldest first."""
    log = _log(request)
    entries = await run(
        request, log.list, since=moment(since, parse_since, "since") if since else None, actor=actor, limit=limit
    )
    return json_response({"entries": [e.to_dict() for e in entries]})


async def verify_audit(
    request: Request, expect_head: str | None = Query(None, max_length=64, pattern="^[0-9a-fA-F]{64}$")
) -> Response:
    log = _log(request)
    return json_response((await run(request, log.verify, expect_head=expect_head)).to_dict())


async def usage(
    request: Request,
    key: str | None = Query(None, max_length=16, description="Only this key id (`-`: requests with auth off)."),
    model: str | None = Query(None, max_length=128),
    since: str | None = Query(None, max_length=64, description=_TIME),
    until: str | None = Query(None, max_length=64, description=_TIME),
    by: str = Query("day", pattern=f"^({'|'.join(PERIODS)})$"),
) -> Response:
    """Totals per key, model, version and period. A key that is not an admin's sees only its own usage."""
    p = current_principal()
    if not p.is_admin:
        if key is not None and key != p.key_id:
            raise Forbidden("the usage of other keys needs an admin key; leave out `key` to see this key's own")
        key = p.key_id
    store = UsageStore(database_of(registry(request)))
    totals = await run(
        request,
        store.query,
        key_id=key,
        model=model,
        since=moment(since, parse_since, "since") if since else None,
        until=moment(until, parse_since, "until") if until else None,
        by=by,
    )
    return json_response({"usage": [t.to_dict() for t in totals]})
