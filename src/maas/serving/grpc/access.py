"""Access control for gRPC calls: the key in the call's ``authorization`` metadata (``Bearer <key>``, as for REST),
the limits it may spend, and what the call used. Liveness and readiness stay open, as ``/v2/health/*`` do."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from maas.access.principal import LOCAL
from maas.errors import MaasError
from maas.serving.access.context import RequestMeter, acting_as
from maas.serving.access.control import AccessControl

#: RPCs answered without a key.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})

T = TypeVar("T")


async def guarded(access: AccessControl, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """``work`` run as the call's principal, within its limits, metered; its errors are the caller's to render."""
    try:
        principal = LOCAL
        if access.required:
            authorization = _metadata(context, "authorization")
            principal = await access.authenticator.authenticate(authorization, client_address(context))
        admission = await access.admit(principal)
    except MaasError:
        _close(work)
        raise
    meter = RequestMeter()
    try:
        with acting_as(principal, meter):
            result = await work
        await access.release(admission)  # the slot is free before the answer leaves, as for REST
        return result
    except BaseException:
        meter.error = True
        raise
    finally:
        access.finish(principal, admission, meter)


def _close(work: Awaitable[T]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: closed, so Python does not warn of it


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The client's address without its port (``ipv4:127.0.0.1:5555`` → ``127.0.0.1``)."""
    peer = context.peer() or "-"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return peer
