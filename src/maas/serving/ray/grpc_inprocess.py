"""Run a forwarded gRPC call through the plain server's handlers in this process (the replica side of the gRPC
front; no Ray here): the same :class:`~maas.serving.grpc.server.InferenceServicer`, so keys, limits, metering and
error statuses are those of plain ``maas serve``, over a stand-in for grpc's servicer context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from maas.serving.ray.forwarded import GrpcCall, GrpcReply, Metadata

if TYPE_CHECKING:
    from maas.serving.context import ServingContext


class Aborted(Exception):
    """What :meth:`CallContext.abort` raises, as grpc's does: the status the call ends with."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...]) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.trailing = trailing


class CallContext:
    """What the servicer, its :class:`Intake` and :mod:`maas.serving.grpc.access` use of ``grpc.aio.ServicerContext``,
    for a call whose message is already here."""

    def __init__(self, metadata: Metadata, peer: str, body: bytes) -> None:
        self._metadata = metadata
        self._peer = peer
        self._body: bytes | None = body

    async def read(self) -> Any:
        """The request message, once; then ``grpc.aio.EOF``."""
        body, self._body = self._body, None
        return grpc.aio.EOF if body is None else body

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple[tuple[str, str], ...] = ()
    ) -> NoReturn:
        raise Aborted(code, details, tuple(trailing_metadata))


def handlers_of(ctx: ServingContext) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers over a replica's serving context, bounded as ``maas serve``'s gRPC server is."""
    from maas.serving.grpc.server import InferenceServicer, Intake  # the serving engine: not in the front's process

    settings = ctx.settings
    intake = Intake.bounded(
        ctx.inflight,
        max_message_bytes=settings.max_request_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    return InferenceServicer(ctx.engine, intake, ctx.access).handlers()


async def run_call(handlers: dict[str, grpc.RpcMethodHandler], call: GrpcCall) -> GrpcReply:
    """``call`` answered by its handler; a method not in ``handlers`` is ``UNIMPLEMENTED``, as grpc answers it."""
    handler = handlers.get(call.method)
    if handler is None:
        return GrpcReply(grpc.StatusCode.UNIMPLEMENTED.name, f"Method not found: {call.method}", (), b"")
    context = CallContext(call.metadata, call.peer, call.body)
    try:
        response = await handler.stream_unary(_no_messages(), context)
    except Aborted as exc:
        return GrpcReply(exc.code.name, exc.details, exc.trailing, b"")
    body: bytes = handler.response_serializer(response)
    return GrpcReply(grpc.StatusCode.OK.name, "", (), body)


async def _no_messages() -> AsyncIterator[bytes]:
    """The request iterator the handlers are given and never read (they read through the context)."""
    return
    yield b""
