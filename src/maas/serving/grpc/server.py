"""The gRPC endpoint: ``inference.GRPCInferenceService`` on grpcio's asyncio server, over the serving engine.

Errors are statuses: a :class:`~maas.errors.MaasError` aborts the call with its ``grpc_code`` and its message made
fit for a client (:func:`maas.serving.errors.public_message`); 429- and 503-like ones (``RESOURCE_EXHAUSTED`` from
a full decode queue, ``UNAVAILABLE``) also carry ``retry-after: 1`` in the trailing metadata. Anything else is a
bug: logged in full under a request id, answered ``INTERNAL`` with only that id. Handlers take the request's bytes
and parse them themselves, so a malformed message is ``INVALID_ARGUMENT`` (grpcio would answer ``INTERNAL``); a
message over ``max_message_bytes`` never reaches them (grpcio answers ``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from maas.errors import InvalidInput, MaasError, RateLimited, Unavailable
from maas.serving.engine.core import Engine
from maas.serving.errors import public_message
from maas.serving.grpc import codec, model_config
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

#: ``inference.GRPCInferenceService``, the name tritonclient and every OIP client call.
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Requests over this size are decoded in a thread, at most ``max_concurrent_decodes`` at once (else 429-like);
#: responses over it are encoded in a thread.
HEAVY_BYTES = 256 * 1024

T = TypeVar("T")
M = TypeVar("M")


class InferenceServicer:
    """The RPCs of the service: the OIP's six and Triton's ``ModelConfig``. Each takes the request's serialized
    bytes and the call's context."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The method handlers of the service, by method name."""
        responses: dict[str, tuple[Any, Any]] = {
            "ServerLive": (self.ServerLive, pb.ServerLiveResponse),
            "ServerReady": (self.ServerReady, pb.ServerReadyResponse),
            "ModelReady": (self.ModelReady, pb.ModelReadyResponse),
            "ServerMetadata": (self.ServerMetadata, pb.ServerMetadataResponse),
            "ModelMetadata": (self.ModelMetadata, pb.ModelMetadataResponse),
            "ModelInfer": (self.ModelInfer, pb.ModelInferResponse),
            "ModelConfig": (self.ModelConfig, pb.ModelConfigResponse),
        }
        return {
            name: grpc.unary_unary_rpc_method_handler(method, response_serializer=response.SerializeToString)
            for name, (method, response) in responses.items()
        }

    async def ServerLive(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return await _answer(context, "ServerLive", self._server_live(data))

    async def ServerReady(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return await _answer(context, "ServerReady", self._server_ready(data))

    async def ModelReady(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return await _answer(context, "ModelReady", self._model_ready(data))

    async def ServerMetadata(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return await _answer(context, "ServerMetadata", self._server_metadata(data))

    async def ModelMetadata(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return await _answer(context, "ModelMetadata", self._model_metadata(data))

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await _answer(context, "ModelInfer", self._model_infer(data))

    async def ModelConfig(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return await _answer(context, "ModelConfig", self._model_config(data))

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
        if sum(a.nbytes for a in response.outputs.values()) <= HEAVY_BYTES:
            return codec.encode_response(response)
        loop = asyncio.get_running_loop()
        encoded: pb.ModelInferResponse = await loop.run_in_executor(
            self.engine.executor, codec.encode_response, response
        )
        return encoded


async def start_grpc(
    engine: Engine, host: str, port: int, *, max_message_bytes: int, reuse_port: bool = False
) -> grpc.aio.Server:
    """Serve ``inference.GRPCInferenceService`` on ``host:port`` and return the started
    server; stop it with ``await server.stop(grace_s)``. Messages over ``max_message_bytes`` either way are refused
    with ``RESOURCE_EXHAUSTED``. Raises :class:`OSError` when the address cannot be bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Linux lets a second process bind a port in use with SO_REUSEPORT (grpcio's default) and share its
            # connections; a port in use must be an error instead.
            ("grpc.so_reuseport", int(reuse_port)),
        ]
    )
    handlers = InferenceServicer(engine).handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:  # grpcio says only that binding failed
        raise OSError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not one of this machine's; "
            "pick another port with --grpc-port (MAAS_GRPC_PORT) or serve no gRPC with --no-grpc"
        ) from None
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) serving on %s", address)
    return server


# --- helpers -----------------------------------------------------------------------------------------------------


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


async def _answer(context: grpc.aio.ServicerContext, method: str, work: Awaitable[T]) -> T:
    """The result of ``work``, or the call aborted with the status its error maps to."""
    try:
        return await work
    except Exception as exc:
        await _abort(context, method, exc)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, MaasError) and type(exc) is not MaasError:
        trailing = (("retry-after", "1"),) if isinstance(exc, RateLimited | Unavailable) else ()
        await context.abort(grpc.StatusCode[exc.grpc_code], public_message(str(exc)), trailing)
    rid = uuid.uuid4().hex[:16]
    log.error("gRPC %s (request id %s) failed", method, rid, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal server error; the server's log has the details under request id {rid}"
    )
    raise AssertionError("context.abort returned")  # it always raises
