"""The gRPC endpoint: ``inference.GRPCInferenceService`` on grpcio's asyncio server, over the serving engine.

Errors are statuses: a :class:`~maas.errors.MaasError` aborts the call with its ``grpc_code`` and its message made
fit for a client (:func:`maas.serving.errors.public_message`); 429- and 503-like ones (``RESOURCE_EXHAUSTED`` from
a full decode queue, ``UNAVAILABLE``) also carry ``retry-after: 1`` in the trailing metadata. Anything else is a
bug: logged in full under a request id, answered ``INTERNAL`` with only that id. Handlers take the request's bytes
and parse them themselves, so a malformed message is ``INVALID_ARGUMENT`` (grpcio would answer ``INTERNAL``); a
message over ``max_message_bytes`` never reaches them (grpcio answers ``RESOURCE_EXHAUSTED``).

What clients can hold is bounded as for REST (:mod:`maas.serving.connections`, :mod:`maas.serving.guard`): messages
come in through an :class:`Intake` (a few at once, within a deadline) and count against the process's in-flight
byte budget while their call runs; connections are capped, must start HTTP/2 within the header timeout, and are
closed when idle (:func:`start_grpc`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from maas.errors import InvalidInput, MaasError, RateLimited, RequestTimeout, Unavailable
from maas.serving import memory
from maas.serving.access.control import AccessControl
from maas.serving.budget import InflightBytes
from maas.serving.engine.core import Engine
from maas.serving.errors import public_message
from maas.serving.grpc import codec, model_config
from maas.serving.grpc.access import OPEN_METHODS, guarded
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.limits import payload_bytes
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)

#: ``inference.GRPCInferenceService``, the name tritonclient and every OIP client call.
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Requests over this size are decoded in a thread, at most ``max_concurrent_decodes`` at once (else 429-like);
#: responses over it are encoded in a thread.
HEAVY_BYTES = 256 * 1024
#: The shortest idle time after which a caller should have connections closed: a gRPC channel reconnects unseen on
#: its next call, but that costs it round trips, so a client calling now and then should not be churned.
MIN_IDLE_TIMEOUT_S = 30.0
#: Trailing metadata of a status a client should retry (429- and 503-like).
RETRY_AFTER = (("retry-after", "1"),)

_DEFAULTS = ServerSettings()

T = TypeVar("T")
M = TypeVar("M")


class Intake:
    """How a call's request message comes in and what it holds meanwhile.

    grpcio buffers a message whole before a handler sees it, and nothing tells its size sooner; so a message is read
    only in one of ``receivers`` slots (the budget over the largest message, so what arrives at once stays within
    the budget too), waiting up to ``wait_s`` for one (then ``UNAVAILABLE``), and must arrive within ``receive_s``
    (then ``DEADLINE_EXCEEDED``, freeing the slot). A message read is charged to ``inflight`` until :meth:`release`,
    or refused ``UNAVAILABLE`` past the budget, as REST bodies are. The price: clients that stall mid-message can
    hold every slot for ``receive_s`` at a time, delaying other gRPC calls (never REST)."""

    def __init__(self, inflight: InflightBytes, *, receivers: int, wait_s: float, receive_s: float) -> None:
        self.inflight = inflight
        self.receivers = receivers
        self.wait_s = wait_s
        self.receive_s = receive_s
        self._slots = asyncio.Semaphore(receivers)

    @classmethod
    def bounded(
        cls, inflight: InflightBytes, *, max_message_bytes: int, header_timeout_s: float, body_timeout_s: float
    ) -> Intake:
        """The intake of a server taking messages up to ``max_message_bytes`` (the bounds :func:`start_grpc` says)."""
        receivers = max(1, inflight.limit // max_message_bytes)
        return cls(inflight, receivers=receivers, wait_s=header_timeout_s, receive_s=body_timeout_s)

    async def receive(self, context: grpc.aio.ServicerContext) -> bytes:
        """The call's message, charged to the budget: :meth:`release` its size when the call is done with it."""
        data = await self._read(context)
        size = len(data)
        if not self.inflight.fits(size):
            raise Unavailable(self.inflight.busy_message())
        self.inflight.take(size)
        return data

    def release(self, size: int) -> None:
        self.inflight.give(size)
        if size > HEAVY_BYTES:
            # malloc_trim walks the heap; off the loop (ctypes releases the GIL meanwhile)
            asyncio.get_running_loop().run_in_executor(None, memory.trim)

    async def _read(self, context: grpc.aio.ServicerContext) -> bytes:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise Unavailable(
                    f"the server is receiving {self.receivers} request messages already, as many as "
                    "MAAS_MAX_INFLIGHT_BYTES / MAAS_MAX_REQUEST_BYTES allows at once; retry shortly"
                ) from None
        else:
            await self._slots.acquire()  # returns at once
        try:
            async with asyncio.timeout(self.receive_s):
                # Not the request iterator: its generator would keep the message alive after the call.
                data = await context.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request message did not arrive within {self.receive_s:g} s (MAAS_BODY_TIMEOUT_S)"
            ) from None
        finally:
            self._slots.release()
        if not isinstance(data, bytes):  # grpc.aio.EOF
            raise InvalidInput("the call carried no request message; send exactly one")
        return data


class InferenceServicer:
    """The RPCs of the service: the OIP's six and Triton's ``ModelConfig``. Each reads its request's serialized bytes
    through ``intake`` and parses them itself."""

    def __init__(self, engine: Engine, intake: Intake, access: AccessControl | None = None) -> None:
        self.engine = engine
        self.intake = intake
        #: Keys, limits and metering (None: every call acts as the local principal, as with auth off).
        self.access = access

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The method handlers of the service, by method name. They are stream-unary handlers, which on the wire
        are the same as unary ones: that kind alone lets a handler run before the message is read."""
        rpcs: dict[str, tuple[Callable[[bytes], Awaitable[Any]], Any]] = {
            "ServerLive": (self._server_live, pb.ServerLiveResponse),
            "ServerReady": (self._server_ready, pb.ServerReadyResponse),
            "ModelReady": (self._model_ready, pb.ModelReadyResponse),
            "ServerMetadata": (self._server_metadata, pb.ServerMetadataResponse),
            "ModelMetadata": (self._model_metadata, pb.ModelMetadataResponse),
            "ModelInfer": (self._model_infer, pb.ModelInferResponse),
            "ModelConfig": (self._model_config, pb.ModelConfigResponse),
        }
        return {
            name: grpc.stream_unary_rpc_method_handler(
                self._rpc(name, work), response_serializer=response.SerializeToString
            )
            for name, (work, response) in rpcs.items()
        }

    def _rpc(
        self, method: str, work: Callable[[bytes], Awaitable[T]]
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Awaitable[T]]:
        async def handle(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> T:
            if self.access is None or method in OPEN_METHODS:
                return await answer(context, method, self._serve(context, work))
            return await answer(context, method, guarded(self.access, context, self._serve(context, work)))

        return handle

    async def _serve(self, context: grpc.aio.ServicerContext, work: Callable[[bytes], Awaitable[T]]) -> T:
        data = await self.intake.receive(context)
        try:
            return await work(data)
        finally:
            self.intake.release(len(data))

    # --- the work of each RPC ------------------------------------------------------------------

    async def _server_live(self, data: bytes) -> pb.ServerLiveResponse:
        _parse(pb.ServerLiveRequest, data)
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, data: bytes) -> pb.ServerReadyResponse:
        _parse(pb.ServerReadyRequest, data)
        ready, _ = self.engine.server_ready()
        return pb.ServerReadyResponse(ready=ready)

    async def _model_ready(self, data: bytes) -> pb.ModelReadyResponse:
        request = _parse(pb.ModelReadyRequest, data)
        ready, _ = await self.engine.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def _server_metadata(self, data: bytes) -> pb.ServerMetadataResponse:
        _parse(pb.ServerMetadataRequest, data)
        meta = self.engine.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def _model_metadata(self, data: bytes) -> pb.ModelMetadataResponse:
        request = _parse(pb.ModelMetadataRequest, data)
        meta = await self.engine.model_metadata(request.name, request.version or None)
        return codec.model_metadata(meta.name, meta.versions, meta.platform, meta.inputs, meta.outputs)

    async def _model_config(self, data: bytes) -> pb.ModelConfigResponse:
        request = _parse(pb.ModelConfigRequest, data)
        config = await self.engine.model_config(request.name, request.version or None)
        return model_config.model_config(config)

    async def _model_infer(self, data: bytes) -> pb.ModelInferResponse:
        request = _parse(pb.ModelInferRequest, data)
        decode = functools.partial(codec.decode_request, request, limits=self.engine.limits)
        _, response = await self.engine.infer(
            request.model_name, request.model_version or None, decode, heavy=len(data) > HEAVY_BYTES
        )
        if sum(payload_bytes(a) for a in response.outputs.values()) <= HEAVY_BYTES:
            return codec.encode_response(response)
        loop = asyncio.get_running_loop()
        encoded: pb.ModelInferResponse = await loop.run_in_executor(
            self.engine.executor, codec.encode_response, response
        )
        return encoded


async def start_grpc(
    engine: Engine,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    reuse_port: bool = False,
    inflight: InflightBytes | None = None,
    max_connections: int = _DEFAULTS.max_connections,
    header_timeout_s: float = _DEFAULTS.header_timeout_s,
    body_timeout_s: float = _DEFAULTS.body_timeout_s,
    idle_timeout_s: float = MIN_IDLE_TIMEOUT_S,
    tls: tuple[bytes, bytes] | None = None,
    access: AccessControl | None = None,
) -> grpc.aio.Server:
    """Serve ``inference.GRPCInferenceService`` on ``host:port`` and return the started server; stop it with
    ``await server.stop(grace_s)``. Raises :class:`OSError` when the address cannot be bound.

    The bounds, beside ``max_message_bytes`` either way (over it, ``RESOURCE_EXHAUSTED``): request messages held in
    flight are charged to ``inflight``, the process's budget REST charges too (when None, one of the default
    ``MAAS_MAX_INFLIGHT_BYTES``), and are read as :class:`Intake` says (within ``header_timeout_s`` of arriving,
    ``body_timeout_s`` to come in); at most ``max_connections`` connections (grpc closes more as it accepts them)
    and as many calls at once (more get ``RESOURCE_EXHAUSTED``); a connection has ``header_timeout_s`` to send its
    HTTP/2 preface and settings, and is closed after ``idle_timeout_s`` without a call.

    ``tls``, the (private key, certificate chain) PEM bytes, serves TLS only (:meth:`ServerSettings.tls`).
    ``access`` checks each call's key, limits and usage (:mod:`maas.serving.grpc.access`); None: none.
    """
    if inflight is None:
        inflight = InflightBytes(_DEFAULTS.max_inflight_bytes)
    intake = Intake.bounded(
        inflight, max_message_bytes=max_message_bytes, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s
    )
    return await serve(
        InferenceServicer(engine, intake, access).handlers(),
        host,
        port,
        max_message_bytes=max_message_bytes,
        reuse_port=reuse_port,
        max_connections=max_connections,
        header_timeout_s=header_timeout_s,
        idle_timeout_s=idle_timeout_s,
        tls=tls,
    )


async def serve(
    handlers: dict[str, grpc.RpcMethodHandler],
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    reuse_port: bool,
    max_connections: int,
    header_timeout_s: float,
    idle_timeout_s: float,
    tls: tuple[bytes, bytes] | None,
) -> grpc.aio.Server:
    """Serve ``handlers`` as ``inference.GRPCInferenceService`` on ``host:port`` with the connection bounds and TLS
    :func:`start_grpc` describes, and return the started server. Raises :class:`OSError` when the address cannot be
    bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Linux lets a second process bind a port in use with SO_REUSEPORT (grpcio's default) and share its
            # connections; a port in use must be an error instead.
            ("grpc.so_reuseport", int(reuse_port)),
            # Every connection holds a file descriptor, which HTTP needs too.
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", _ms(header_timeout_s)),
            # A channel left idle reconnects on its next call, unseen by its user.
            ("grpc.max_connection_idle_ms", _ms(idle_timeout_s)),
            # BDP probing widens every stream's window to megabytes, which grpc fills before a handler reads: calls
            # waiting for a slot would hold that much each. Without it a message being read still gets a window of
            # its size (one round trip more for a large one).
            ("grpc.http2.bdp_probe", 0),
        ],
        maximum_concurrent_rpcs=max_connections,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError:  # grpcio says only that binding failed
        raise OSError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not one of this machine's; "
            "pick another port with --grpc-port (MAAS_GRPC_PORT) or serve no gRPC with --no-grpc"
        ) from None
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) serving on %s%s", address, " (TLS)" if tls else "")
    return server


# --- helpers -----------------------------------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _parse(kind: type[M], data: bytes) -> M:
    parser: Any = kind
    try:
        message: M = parser.FromString(data)
    except DecodeError as exc:
        raise InvalidInput(
            f"the request is not a valid {parser.DESCRIPTOR.full_name} message ({exc}); send the message "
            "grpc_predict_v2.proto defines"
        ) from None
    return message


async def answer(context: grpc.aio.ServicerContext, method: str, work: Awaitable[T]) -> T:
    """The result of ``work``, or the call aborted with the status its error maps to."""
    try:
        return await work
    except Exception as exc:
        code, details, trailing = _status(method, exc)
    # Aborted only once the error and its traceback are gone: grpc keeps the abort's exception in a reference cycle
    # with the call, and a traceback through the handler's frames would keep the request message (megabytes) alive
    # until the garbage collector's next full pass.
    await context.abort(code, details, trailing)
    raise AssertionError("context.abort returned")  # it always raises


def _status(method: str, exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    if isinstance(exc, MaasError) and type(exc) is not MaasError:
        trailing = RETRY_AFTER if isinstance(exc, RateLimited | Unavailable) else ()
        return grpc.StatusCode[exc.grpc_code], public_message(str(exc)), trailing
    rid = uuid.uuid4().hex[:16]
    log.error("gRPC %s (request id %s) failed", method, rid, exc_info=exc)
    details = f"internal server error; the server's log has the details under request id {rid}"
    return grpc.StatusCode.INTERNAL, details, ()
