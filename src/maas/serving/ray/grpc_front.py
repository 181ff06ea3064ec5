"""The gRPC front door of ``maas serve --engine ray``: ``inference.GRPCInferenceService`` on ``--grpc-port`` in the
``maas serve`` process, on a server bounded as plain ``maas serve``'s (:func:`maas.serving.grpc.server.serve`).

Each call's message is read through an :class:`~maas.serving.grpc.server.Intake` (the bounds of the plain server)
and forwarded, with the call's metadata and the client's address, to a replica's ``forward_grpc``, which runs the
plain server's handlers: keys, limits, metering and error statuses are theirs. A call whose replica died is sent
again to another replica as a REST request is (:mod:`maas.serving.ray.retry`): every RPC of the service is a read
or an inference, safe to repeat. The server runs on an event loop of its own, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from maas.serving.budget import InflightBytes
from maas.serving.grpc.access import client_address
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.grpc.server import MIN_IDLE_TIMEOUT_S, RETRY_AFTER, SERVICE, Intake, answer, serve
from maas.serving.listen import claim_port
from maas.serving.ray.doorman import Doorman
from maas.serving.ray.forwarded import GrpcCall, GrpcReply
from maas.serving.ray.retry import Retries, replica_crashed, replica_died
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)

#: The RPCs of the service, every one unary.
METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name[SERVICE.rpartition(".")[2]].methods)
#: How long calls in progress have to finish once the front stops.
STOP_GRACE_S = 5.0
#: How long a started server's thread has to end.
STOP_TIMEOUT_S = 15.0


class Relay:
    """The service's handlers over ``handle``, the deployment's (non-streaming) handle."""

    def __init__(
        self, handle: Any, intake: Intake, retries: Callable[[], Retries] = Retries, doorman: Doorman | None = None
    ) -> None:
        self._handle = handle
        self._intake = intake
        self._retries = retries
        self._doorman = doorman

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Stream-unary handlers, as the plain server's (the message is read through the intake), without
        serializers: the replica parses the request bytes and serializes the response."""
        return {name: grpc.stream_unary_rpc_method_handler(self._rpc(name)) for name in METHODS}

    def _rpc(self, method: str) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
        async def handle(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            reply = await answer(context, method, self._forward(method, context))
            if reply.code != grpc.StatusCode.OK.name:
                await context.abort(grpc.StatusCode[reply.code], reply.details, reply.trailing)
            return reply.body

        return handle

    async def _forward(self, method: str, context: grpc.aio.ServicerContext) -> GrpcReply:
        metadata = tuple((str(key), value) for key, value in context.invocation_metadata() or ())
        if self._doorman is not None:  # as the plain server: no message read for a stranger
            await self._doorman.grpc(method, metadata, client_address(context))
        data = await self._intake.receive(context)
        size = len(data)
        try:
            call = GrpcCall(method, metadata, str(context.peer()), data)
            del data
            return await self._call(call)
        finally:
            self._intake.release(size)

    async def _call(self, call: GrpcCall) -> GrpcReply:
        retries = self._retries()
        while True:
            response = self._handle.forward_grpc.remote(call)
            try:
                reply: GrpcReply = await response
                return reply
            except asyncio.CancelledError:  # the client went away or its deadline passed
                response.cancel()
                raise
            except Exception as exc:
                wait = retries.next_wait(crashed=replica_crashed(exc)) if replica_died(exc) else None
                if wait is None:
                    return _failure(call, exc, retries.made)
                log.warning("gRPC %s: the replica died (%s); trying another", call.method, type(exc).__name__)
                await asyncio.sleep(wait)


def _failure(call: GrpcCall, exc: Exception, attempts: int) -> GrpcReply:
    """The status of a call no replica answered."""
    if replica_died(exc):
        details = f"the replicas died or were unavailable in {attempts} attempts; retry shortly"
        return GrpcReply(grpc.StatusCode.UNAVAILABLE.name, details, RETRY_AFTER, b"")
    log.error("gRPC %s: the replica call failed", call.method, exc_info=exc)
    details = f"the replica failed to answer ({type(exc).__name__}); the server's log has the details"
    return GrpcReply(grpc.StatusCode.INTERNAL.name, details, (), b"")


class GrpcFront:
    """The server, on a loop in a thread of its own. The port is checked free when this is made (before Ray starts:
    a taken port fails at once) and bound by :meth:`start`, once every replica runs: until then a client's
    connection is refused rather than left waiting."""

    def __init__(self, settings: ServerSettings) -> None:
        assert settings.grpc_port is not None
        port = claim_port(settings.host, settings.grpc_port, "gRPC", "--grpc-port")
        #: ``settings`` with the port resolved (``--grpc-port 0`` picks a free one).
        self.settings = settings.model_copy(update={"grpc_port": port})
        self._tls = settings.tls()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(self, handle: Any, *, timeout_s: float = 30.0) -> None:
        """Serve calls through ``handle`` from a thread; returns once the server listens. Raises :class:`OSError`
        if the port cannot be bound (taken since it was checked), RuntimeError if the server did not start."""
        started = threading.Event()
        failed: list[BaseException] = []
        work = self._serve(handle.options(stream=False), started, failed)
        self._thread = threading.Thread(target=asyncio.run, args=(work,), name="maas-grpc-front", daemon=True)
        self._thread.start()
        if not started.wait(timeout_s):
            raise RuntimeError(f"the gRPC front did not start within {timeout_s:g} s; the log above says why")
        if failed:
            self._thread.join(STOP_TIMEOUT_S)
            raise failed[0]

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop taking calls and let those in progress finish (:data:`STOP_GRACE_S` at most)."""
        if self._loop is None or self._stopping is None or not self.alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._stopping.set)
        assert self._thread is not None
        self._thread.join(STOP_TIMEOUT_S)

    async def _serve(self, handle: Any, started: threading.Event, failed: list[BaseException]) -> None:
        s = self.settings
        assert s.grpc_port is not None
        try:
            intake = Intake.bounded(
                InflightBytes(s.max_inflight_bytes),
                max_message_bytes=s.max_request_bytes,
                header_timeout_s=s.header_timeout_s,
                body_timeout_s=s.body_timeout_s,
            )
            server = await serve(
                Relay(handle, intake, doorman=Doorman(s)).handlers(),
                s.host,
                s.grpc_port,
                max_message_bytes=s.max_request_bytes,
                reuse_port=False,
                max_connections=s.max_connections,
                header_timeout_s=s.header_timeout_s,
                idle_timeout_s=max(s.keepalive_timeout_s, MIN_IDLE_TIMEOUT_S),
                tls=self._tls,
            )
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            failed.append(exc)
            started.set()
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        started.set()
        await self._stopping.wait()
        await server.stop(STOP_GRACE_S)
