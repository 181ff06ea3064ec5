"""One Ray Serve replica of ``maas serve --engine ray``: a whole maas app (its own model manager, batchers and
metrics), built in the replica's own process, answering the requests the front forwards to :meth:`forward` and
the gRPC calls it forwards to :meth:`forward_grpc`.

Ray Serve builds the app through ``__serve_build_asgi_app__`` (deployed with ``serve.ingress()``) and runs its
lifespan, which starts the model manager, and its shutdown; no Ray proxy serves it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
from starlette.types import ASGIApp

from maas import envs
from maas.serving.ray.forwarded import Chunk, ForwardedRequest, GrpcCall, GrpcReply, Head
from maas.serving.ray.grpc_inprocess import handlers_of, run_call
from maas.serving.ray.inprocess import answer
from maas.serving.settings import ServerSettings
from maas.serving.worker import tag_responses

#: Response header naming the replica that answered (Ray's replica id, not a pid or host name).
REPLICA_HEADER = "x-maas-replica"


class MaasReplica:
    def __init__(self, settings: dict[str, Any], loopback: bool, secrets: dict[str, str] | None = None) -> None:
        os.environ.update(secrets or {})  # settings holding credentials, kept out of Ray's runtime_env and its logs
        self._settings = ServerSettings.model_validate(settings)
        self._app: ASGIApp | None = None
        self._grpc: dict[str, grpc.RpcMethodHandler] = {}
        if loopback:
            _inter_deployment_grpc_on_loopback()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from ray import serve

        from maas.serving.app import create_app

        logging.getLogger("maas").setLevel(str(envs.MAAS_LOG_LEVEL or "info").upper())
        replica = serve.get_replica_context().replica_id.unique_id
        app = create_app(self._settings)
        self._grpc = handlers_of(app.state.ctx)
        self._app = tag_responses(app, replica, REPLICA_HEADER.encode())
        return self._app

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Head | Chunk]:
        """The app's answer to a request the front read (called with ``stream=True``); cancelling the call tells
        the app its client went away."""
        assert self._app is not None, "Ray Serve builds the app before it sends requests"
        async for part in answer(self._app, request):
            yield part

    async def forward_grpc(self, call: GrpcCall) -> GrpcReply:
        """The app's answer to a gRPC call the front received, as plain ``maas serve``'s gRPC server gives it."""
        assert self._grpc, "Ray Serve builds the app before it sends requests"
        return await run_call(self._grpc, call)


def _inter_deployment_grpc_on_loopback() -> None:
    """Ray Serve 2.60's replica opens a gRPC server for calls between deployments on ``[::]:0`` (hard-coded, after
    the app is built): on a local Ray, bind it to loopback like every other Ray port. maas makes no such calls."""
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "maas_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> Any:
        return add_port(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.maas_loopback = True  # type: ignore[attr-defined]
    setattr(replica, "add_port_to_grpc_server", on_loopback)  # noqa: B010 (a private name mypy cannot see)
