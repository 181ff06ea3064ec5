"""gRPC under ``maas serve --engine ray`` without Ray running: a forwarded call run through the plain server's own
servicer on the replica side (statuses, keys and the client's address as plain ``maas serve`` sees them), and the
front's handlers against a fake deployment handle (retries when a replica dies, statuses relayed, the server's
thread started and stopped). The real thing, with tritonclient against replicas, is tests/integration/
test_ray_serve.py."""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from maas.access.principal import LOCAL
from maas.errors import NotFound, Unauthorized
from maas.serving.budget import InflightBytes
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.grpc.server import SERVICE, InferenceServicer, Intake
from maas.serving.listen import PortInUse
from maas.serving.ray.forwarded import GrpcCall, GrpcReply
from maas.serving.ray.grpc_front import METHODS, GrpcFront, Relay
from maas.serving.ray.grpc_inprocess import Aborted, CallContext, run_call
from maas.serving.ray.retry import Retries
from maas.serving.settings import ServerSettings
from tests.integration.test_tls import make_pki

ray_errors = pytest.importorskip("ray.exceptions", reason="Ray Serve not installed: pip install 'maas[ray]'")
with warnings.catch_warnings():  # Ray Serve's own pydantic models warn on import (retry.replica_died's); not ours
    warnings.simplefilter("ignore")
    import ray.serve.exceptions  # noqa: F401

PEER = "ipv4:10.0.0.5:51234"
KEY = (("authorization", "Bearer k1"),)
OK = grpc.StatusCode.OK.name


def intake() -> Intake:
    return Intake.bounded(InflightBytes(1 << 20), max_message_bytes=1 << 16, header_timeout_s=1, body_timeout_s=1)


async def _none() -> AsyncIterator[bytes]:
    return
    yield b""


class TinyEngine:
    """Ready, and serving no model."""

    def server_ready(self) -> tuple[bool, str]:
        return True, ""

    async def model_metadata(self, name: str, version: str | None) -> Any:
        raise NotFound(f"model {name!r} is not registered")


class KeyCheck:
    """Access control that takes only ``Bearer k1``, recording the header and client address it was given."""

    required = True

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str]] = []
        self.authenticator = self

    async def authenticate(self, header: str | None, client: str) -> Any:
        self.seen.append((header, client))
        if header != "Bearer k1":
            raise Unauthorized("a valid API key is required")
        return LOCAL

    async def admit(self, principal: Any) -> None:
        return None

    async def release(self, admission: Any) -> None:
        return None

    def finish(self, principal: Any, admission: Any, meter: Any) -> None:
        return None


def test_the_context_gives_the_message_once_and_aborts_by_raising() -> None:
    context = CallContext(KEY, PEER, b"message")

    async def main() -> None:
        assert await context.read() == b"message"
        assert await context.read() is grpc.aio.EOF
        with pytest.raises(Aborted) as info:
            await context.abort(grpc.StatusCode.NOT_FOUND, "gone", (("retry-after", "1"),))
        assert (info.value.code, info.value.details, info.value.trailing) == (
            grpc.StatusCode.NOT_FOUND,
            "gone",
            (("retry-after", "1"),),
        )

    asyncio.run(main())
    assert context.invocation_metadata() == KEY and context.peer() == PEER


def test_a_forwarded_call_is_answered_by_the_plain_servicer() -> None:
    access = KeyCheck()
    handlers = InferenceServicer(TinyEngine(), intake(), access).handlers()  # type: ignore[arg-type]

    def call(method: str, body: bytes, metadata: tuple[tuple[str, str], ...] = KEY) -> GrpcReply:
        return asyncio.run(run_call(handlers, GrpcCall(method, metadata, PEER, body)))

    ready = call("ServerReady", pb.ServerReadyRequest().SerializeToString(), metadata=())  # open without a key
    assert ready.code == OK and pb.ServerReadyResponse.FromString(ready.body).ready
    missing = call("ModelMetadata", pb.ModelMetadataRequest(name="nope").SerializeToString())
    assert (missing.code, missing.body) == ("NOT_FOUND", b"") and "'nope'" in missing.details
    assert access.seen == [("Bearer k1", "10.0.0.5")]  # the key and the client's address, as grpc gives them
    refused = call("ModelMetadata", b"", metadata=(("authorization", "Bearer wrong"),))
    assert refused.code == "UNAUTHENTICATED" and "API key" in refused.details
    malformed = call("ModelMetadata", b"\xff\xff")
    assert malformed.code == "INVALID_ARGUMENT" and "ModelMetadataRequest" in malformed.details
    unknown = call("Nope", b"")
    assert unknown.code == "UNIMPLEMENTED"


class Response:
    def __init__(self, outcome: GrpcReply | BaseException) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self) -> Iterator[Any]:
        yield from asyncio.sleep(0).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A deployment handle whose ``forward_grpc`` calls end as ``outcomes`` say, in turn."""

    def __init__(self, *outcomes: GrpcReply | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[GrpcCall] = []
        self.forward_grpc = self

    def options(self, **_: object) -> Handle:
        return self

    def remote(self, call: GrpcCall) -> Response:
        self.calls.append(call)
        return Response(self.outcomes.pop(0))


def relay(handle: Handle, method: str = "ModelInfer") -> bytes:
    quick = Relay(handle, intake(), retries=lambda: Retries(first_s=0.001))
    handler = quick.handlers()[method]
    return asyncio.run(handler.stream_unary(_none(), CallContext(KEY, PEER, b"request")))  # type: ignore[no-any-return]


def test_a_call_whose_replica_died_is_sent_again() -> None:
    handle = Handle(ray_errors.ActorDiedError(), GrpcReply(OK, "", (), b"answer"))
    assert relay(handle) == b"answer"
    assert handle.calls == [GrpcCall("ModelInfer", KEY, PEER, b"request")] * 2


def test_the_replicas_status_is_relayed() -> None:
    trailing = (("retry-after", "1"),)
    handle = Handle(GrpcReply("RESOURCE_EXHAUSTED", "decoding already", trailing, b""))
    with pytest.raises(Aborted) as info:
        relay(handle)
    assert (info.value.code, info.value.details, info.value.trailing) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "decoding already",
        trailing,
    )


def test_failures_of_the_call_itself_are_statuses() -> None:
    failed = Handle(ray_errors.RayTaskError("forward_grpc", "traceback", ValueError("a bug")))
    with pytest.raises(Aborted) as info:
        relay(failed)
    assert info.value.code == grpc.StatusCode.INTERNAL and "replica failed to answer" in info.value.details
    assert len(failed.calls) == 1  # not a dead replica: not sent again
    dead = Handle(*[ray_errors.ActorUnavailableError("unreachable", None) for _ in range(4)])
    with pytest.raises(Aborted) as info:
        relay(dead)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "4 attempts" in info.value.details
    assert info.value.trailing == (("retry-after", "1"),)


def test_the_front_serves_every_rpc_of_the_service_and_stops() -> None:
    assert set(METHODS) == set(InferenceServicer(TinyEngine(), intake()).handlers())  # type: ignore[arg-type]
    front = GrpcFront(ServerSettings(grpc_port=0))
    port = front.settings.grpc_port
    with socket.socket() as taken:  # a port in use fails before anything starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PortInUse, match="--grpc-port"):
            GrpcFront(ServerSettings(grpc_port=taken.getsockname()[1]))
    handle = Handle(GrpcReply(OK, "", (), pb.ServerLiveResponse(live=True).SerializeToString()))
    front.start(handle)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = channel.unary_unary(f"/{SERVICE}/ServerLive", response_deserializer=pb.ServerLiveResponse.FromString)
            assert live(b"", metadata=KEY, timeout=10).live
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(f"/{SERVICE}/ModelStreamInfer")(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert handle.calls[0].method == "ServerLive" and ("authorization", "Bearer k1") in handle.calls[0].metadata
        assert handle.calls[0].peer.startswith("ipv4:127.0.0.1:")
    finally:
        front.stop()
    assert not front.alive()


def test_a_port_taken_after_the_check_fails_start_with_the_plain_servers_error() -> None:
    front = GrpcFront(ServerSettings(grpc_port=0))
    assert front.settings.grpc_port is not None
    with socket.socket() as late:
        late.bind(("127.0.0.1", front.settings.grpc_port))
        late.listen()
        with pytest.raises(OSError, match="--grpc-port"):
            front.start(Handle())
    assert not front.alive()


def test_the_front_serves_tls_with_the_servers_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = ServerSettings(grpc_port=0, ssl_certfile=str(pki.cert), ssl_keyfile=str(pki.key))
    front = GrpcFront(settings)
    handle = Handle(GrpcReply(OK, "", (), pb.ServerLiveResponse(live=True).SerializeToString()))
    front.start(handle)
    try:
        trust = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{front.settings.grpc_port}", trust) as channel:
            live = channel.unary_unary(f"/{SERVICE}/ServerLive", response_deserializer=pb.ServerLiveResponse.FromString)
            assert live(b"", timeout=10).live
        with grpc.insecure_channel(f"127.0.0.1:{front.settings.grpc_port}") as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.unary_unary(f"/{SERVICE}/ServerLive")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # TLS only
    finally:
        front.stop()
