"""What the fronts of ``maas serve --engine ray`` check before they read a request's body or a call's message: the
key, when keys are required, and on a keyless loopback server the browser checks (:mod:`maas.serving.access.browsers`).

Plain ``maas serve`` refuses a request without a valid key before reading its body; a front that read first would
hold up to ``MAAS_MAX_REQUEST_BYTES`` of a stranger's body (and copy it to a replica) before the replica refused it.
So the front authenticates with the same key store, cache and failure throttle (one throttle for every replica), and
the replica checks again what needs the model: the role, the key's model patterns, the limits and the metering.
"""

from __future__ import annotations

from starlette._utils import get_route_path
from starlette.types import Scope

from maas.serving.access.authenticator import Authenticator
from maas.serving.access.browsers import check_local
from maas.serving.access.gate import OPEN_PATHS, client_host, header
from maas.serving.access.mode import auth_required, is_loopback
from maas.serving.grpc.access import OPEN_METHODS
from maas.serving.settings import ServerSettings


class Doorman:
    """See the module docstring. Each check raises the :class:`~maas.errors.MaasError` the plain server answers."""

    def __init__(self, settings: ServerSettings, authenticator: Authenticator | None = None) -> None:
        unauthenticated = settings.allow_unauthenticated
        self.required = auth_required(settings.auth, settings.host, allow_unauthenticated=unauthenticated)
        self.local_only = not self.required and is_loopback(settings.host)
        if self.required and authenticator is None:
            from maas.access.keys import KeyStore, database_of
            from maas.registry import Registry

            authenticator = Authenticator.of(KeyStore(database_of(Registry())))
        self.authenticator = authenticator

    async def http(self, scope: Scope) -> None:
        """Let an HTTP request's body be read, or raise."""
        if get_route_path(scope) in OPEN_PATHS:
            return
        if self.authenticator is not None:
            await self.authenticator.authenticate(header(scope, b"authorization"), client_host(scope))
        elif self.local_only:
            check_local(scope)

    async def grpc(self, method: str, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> None:
        """Let a gRPC call's message be read, or raise (``peer`` the client's address without its port)."""
        if self.authenticator is None or method in OPEN_METHODS:
            return
        authorization = next((v for k, v in metadata if k == "authorization" and isinstance(v, str)), None)
        await self.authenticator.authenticate(authorization, peer)
