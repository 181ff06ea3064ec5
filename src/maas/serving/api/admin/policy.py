"""Who may do what through the admin API, and how its registry work runs: off the event loop, as the caller.

Deny by default: a model the caller may not see answers exactly as a missing one (404); a model it sees but may
not change answers 403, as do keys and the audit log to anyone but an admin.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

import orjson
from fastapi import Request, Response

from maas.access.principal import Principal
from maas.errors import Forbidden
from maas.registry import Registry, validate_name
from maas.registry.audit import AuditContext, audit_context, local_actor
from maas.serving.access.context import current_principal, not_registered
from maas.serving.context import ServingContext

P = ParamSpec("P")
T = TypeVar("T")


def context(request: Request) -> ServingContext:
    ctx: ServingContext = request.app.state.ctx
    return ctx


def registry(request: Request) -> Registry:
    return context(request).registry


def json_response(data: object, status: int = 200) -> Response:
    """``data`` as JSON; a NaN metric becomes null instead of failing the answer."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def actor() -> str | None:
    """The name registry records (alias moves, a version's creator) give the caller: its key, or None with auth
    off, where the server's own user acts."""
    p = current_principal()
    return p.actor if p.key_id else None


def _who(p: Principal) -> str:
    return f"key {p.key_id} ({p.role})" if p.key_id else f"the {p.role} principal"


def readable(name: str) -> str:
    """``name``, validated, if the caller may see the model; else the missing-model error, word for word."""
    validate_name(name)
    if not current_principal().sees(name):
        raise not_registered(name)
    return name


def publishable(name: str) -> str:
    """``name``, validated, if the caller may change the model: 404 when it may not see it, else 403."""
    readable(name)
    p = current_principal()
    if not p.may_publish(name):
        raise Forbidden(
            f"{_who(p)} may read model {name!r} but not change it; registering, aliasing, rolling back, deploying "
            "and deleting need a publisher key whose --models patterns match the model, or an admin key"
        )
    return name


def registrable(name: str) -> str:
    """``name``, validated, if the caller may register versions under it (403 otherwise: the answer is the same
    whether or not the model exists, so it tells nothing)."""
    validate_name(name)
    p = current_principal()
    if not p.may_publish(name):
        raise Forbidden(
            f"{_who(p)} may not register versions of {name!r}: that needs a publisher key whose --models patterns "
            "match the name, or an admin key"
        )
    return name


def admin_only(what: str) -> Principal:
    p = current_principal()
    if not p.is_admin:
        raise Forbidden(f"{what} needs an admin key; {_who(p)} is not one")
    return p


async def run(request: Request, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a worker thread, every registry change it makes audited as the caller of
    ``request``."""
    return await run_in(None, request, fn, *args, **kwargs)


async def run_in(
    executor: Executor | None, request: Request, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """:func:`run` on ``executor`` (None: the loop's default). The thread gets a copy of this task's context: the
    audit context set here, and the principal (a bare ``run_in_executor`` would carry neither)."""
    client = request.client.host if request.client else None
    rid = request.scope.get("maas.request_id")
    ctx = AuditContext(actor=actor() or local_actor(), request_id=rid if isinstance(rid, str) else None, client=client)
    with audit_context(ctx):
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(executor, call)
