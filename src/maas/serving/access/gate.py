"""The REST front door's access check (plain ASGI, inside the request guard): the key a request presents, what its
role may reach, the limits it may still spend, and what it used, recorded when it ends.

Liveness and readiness stay open. With auth off, every request acts as the local principal (admin).
"""

from __future__ import annotations

import orjson
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.access.principal import LOCAL
from maas.errors import Forbidden, MaasError
from maas.serving.access.browsers import check_local
from maas.serving.access.context import RequestMeter, acting_as
from maas.serving.access.control import AccessControl
from maas.serving.errors import error_headers, public_message

#: Paths answered without a key: probes must work before anyone has a key.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


class AccessGate:
    """See the module docstring."""

    def __init__(self, app: ASGIApp, control: AccessControl) -> None:
        self.app = app
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = get_route_path(scope)  # as the router sees it: without a --root-path prefix
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        control = self.control
        principal = LOCAL
        try:
            if control.required:
                principal = await control.authenticator.authenticate(
                    header(scope, b"authorization"), client_host(scope)
                )
            elif control.local_only:
                check_local(scope)
            if path == "/metrics" and not principal.may_read_metrics:
                raise Forbidden("/metrics needs an admin or monitor key")
            admission = await control.admit(principal)
        except MaasError as exc:
            await send_error(send, exc)
            return
        meter = RequestMeter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    meter.error = True
                if admission.headers:
                    message["headers"] = [*message.get("headers", []), *admission.headers]
            elif admission.lease is not None and not message.get("more_body", False):
                await control.release(admission)  # the slot is free before the client can send its next request
            await send(message)

        try:
            with acting_as(principal, meter):
                await self.app(scope, receive, send_counted)
        except BaseException:
            meter.error = True
            raise
        finally:
            control.finish(principal, admission, meter)


async def send_error(send: Send, exc: MaasError) -> None:
    headers = error_headers(exc.http_status, getattr(exc, "headers", None))
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="maas"'
    body = orjson.dumps({"error": public_message(str(exc))})
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """The value of header ``name`` (lower-case bytes) of an HTTP ``scope``; None when absent."""
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def client_host(scope: Scope) -> str:
    """The client's address of an HTTP ``scope`` without its port (``-`` when unknown)."""
    client = scope.get("client")
    return str(client[0]) if client else "-"
