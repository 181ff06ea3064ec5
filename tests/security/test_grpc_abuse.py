"""Crafted messages against the gRPC endpoint of a real ``maas serve``: every one gets INVALID_ARGUMENT or
RESOURCE_EXHAUSTED (UNAVAILABLE and 429-like ones with ``retry-after``) with a message naming the problem or the
limit, never INTERNAL, and the server keeps answering. What clients can hold (bytes in flight, connections, slots
to send a message in) is bounded as for REST. The decoder itself is fuzzed in-process: whatever message arrives, it
returns arrays matching the signature or raises a client error."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import httpx
import numpy as np
import psutil
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas.errors import MaasError
from maas.registry import Registry
from maas.serving.budget import InflightBytes
from maas.serving.engine.core import Engine
from maas.serving.grpc import codec
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.grpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from maas.serving.grpc.server import start_grpc
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec
from maas.testing.models import make_linear_model, make_text_model
from maas.testing.server import RemoteServer, free_port
from tests.security.test_server_abuse import make_reduce_model

pytestmark = pytest.mark.timeout(600)

MiB = 1024 * 1024
LIMITS = {
    "MAAS_MAX_REQUEST_BYTES": str(32 * MiB),
    "MAAS_MAX_TENSOR_ELEMENTS": str(1 << 22),
    "MAAS_MAX_BYTES_ELEMENTS": str(4096),
    "MAAS_MAX_BYTES_ELEMENT_BYTES": str(64 * 1024),
    "MAAS_MAX_OUTPUT_BYTES": str(4 * MiB),
    "MAAS_MAX_CONCURRENT_DECODES": "1",
}
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    home = tmp_path_factory.mktemp("grpc-abuse-home")
    models = tmp_path_factory.mktemp("grpc-abuse-models")
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "linear.onnx"), "linear")
    reg.register(make_text_model(models / "text.onnx"), "text")
    reg.register(make_reduce_model(models / "reduce.onnx"), "reduce")
    with RemoteServer(home, env=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: RemoteServer) -> Iterator[grpc.Channel]:
    # The client's own limits out of the way: the server's are under test.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.grpc_address, options=options) as ch:
        yield ch


def send(channel: grpc.Channel, body: bytes, **kw: object) -> bytes:
    """``body`` as a ModelInferRequest, byte for byte (no serializer: malformed messages too)."""
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    result: bytes = call(body, timeout=60, **kw)
    return result


def live(channel: grpc.Channel) -> bool:
    return bool(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live)


def request(model: str, *inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, raw_input_contents=raw or [])
    for name, datatype, shape in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    return message


def _typed(message: pb.ModelInferRequest, field: str, values: list[object]) -> bytes:
    getattr(message.inputs[0].contents, field).extend(values)
    return message.SerializeToString()


def _with(message: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], object]) -> bytes:
    change(message)
    return message.SerializeToString()


def _bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


X = ("x", "FP32", [1, 4])
GOOD_RAW = [b"\0" * 16]
CASES: dict[str, tuple[bytes, grpc.StatusCode, str]] = {
    "garbage bytes": (b"\xff\xff\xff\xff", INVALID, "not a valid inference.ModelInferRequest"),
    "truncated message": (request("linear", X, raw=GOOD_RAW).SerializeToString()[:-3], INVALID, "not a valid"),
    "invalid UTF-8 in model_name": (b"\x0a\x02\xff\xfe", INVALID, "not a valid"),
    "raw too short": (request("linear", X, raw=[b"\0" * 15]).SerializeToString(), INVALID, "needs 4 x 4 = 16 bytes"),
    "raw too long": (request("linear", X, raw=[b"\0" * 17]).SerializeToString(), INVALID, "17 bytes"),
    "more raw entries than inputs": (
        request("linear", X, raw=GOOD_RAW * 2).SerializeToString(),
        INVALID,
        "raw_input_contents has 2 entries but the request has 1 inputs",
    ),
    "raw and typed mixed": (
        _typed(request("linear", X, raw=GOOD_RAW), "fp32_contents", [1.0] * 4),
        INVALID,
        "all raw (in input order) or all typed",
    ),
    "duplicate inputs": (request("linear", X, X, raw=GOOD_RAW * 2).SerializeToString(), INVALID, "more than once"),
    "huge declared dimension": (
        request("linear", ("x", "FP32", [1 << 62, 4]), raw=GOOD_RAW).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_TENSOR_ELEMENTS",
    ),
    "huge declared product": (
        request("reduce", ("x", "FP32", [1 << 20, 1 << 20]), raw=GOOD_RAW).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_TENSOR_ELEMENTS",
    ),
    "zero times huge": (
        request("reduce", ("x", "FP32", [0, 1 << 40]), raw=[b""]).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_TENSOR_ELEMENTS",
    ),
    "negative dimension": (
        request("linear", ("x", "FP32", [-1, 4]), raw=GOOD_RAW).SerializeToString(),
        INVALID,
        "non-negative",
    ),
    "rank 40": (request("linear", ("x", "FP32", [1] * 40), raw=[b"\0" * 4]).SerializeToString(), INVALID, "40 dim"),
    "unknown datatype": (
        request("linear", ("x", "BF16", [1, 4]), raw=[b"\0" * 8]).SerializeToString(),
        INVALID,
        "BF16",
    ),
    "BYTES length past the end": (
        request("text", ("text", "BYTES", [1]), raw=[struct.pack("<I", 1 << 31) + b"abc"]).SerializeToString(),
        INVALID,
        "declares 2147483648 bytes but only 3 remain",
    ),
    "BYTES prefix cut short": (
        request("text", ("text", "BYTES", [2]), raw=[_bytes_elements(b"a") + b"\x01\x00"]).SerializeToString(),
        INVALID,
        "4-byte length prefix",
    ),
    "more BYTES elements than the shape": (
        request("text", ("text", "BYTES", [1]), raw=[_bytes_elements(b"a", b"b")]).SerializeToString(),
        INVALID,
        "its shape needs 1",
    ),
    "BYTES element over the limit": (
        request("text", ("text", "BYTES", [1]), raw=[_bytes_elements(b"x" * 70_000)]).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_BYTES_ELEMENT_BYTES",
    ),
    "too many BYTES elements": (
        request("text", ("text", "BYTES", [5000]), raw=[_bytes_elements(*[b""] * 5000)]).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_BYTES_ELEMENTS",
    ),
    "typed count off": (_typed(request("linear", X), "fp32_contents", [1.0] * 100_000), INVALID, "needs 4"),
    "typed in the wrong field": (_typed(request("linear", X), "int64_contents", [1] * 4), INVALID, "fp32_contents"),
    "no data at all": (request("linear", X).SerializeToString(), INVALID, "has no data"),
    "id of 1 MB": (_with(request("linear", X, raw=GOOD_RAW), lambda m: setattr(m, "id", "i" * MiB)), INVALID, "id"),
    "shared memory parameter": (
        _with(
            request("linear", X, raw=GOOD_RAW),
            lambda m: m.inputs[0].parameters["shared_memory_region"].CopyFrom(pb.InferParameter(string_param="r")),
        ),
        INVALID,
        "shared_memory_region",
    ),
    "empty model name": (request("", X, raw=GOOD_RAW).SerializeToString(), INVALID, "name"),
    "output over the limit": (
        request("reduce", ("x", "FP32", [1, 1 << 21]), raw=[b"\0" * (8 << 20)]).SerializeToString(),
        EXHAUSTED,
        "MAAS_MAX_OUTPUT_BYTES",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_message_gets_a_client_error(channel: grpc.Channel, server: RemoteServer, case: str) -> None:
    body, code, words = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        send(channel, body)
    error = info.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert words in error.details(), error.details()
    assert live(channel) and server.alive()


def _config(name: str, version: str = "") -> bytes:
    return pb.ModelConfigRequest(name=name, version=version).SerializeToString()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\xff\xff", "not a valid inference.ModelConfigRequest"),
        (b"\x0a\x02\xc3\x28", "not a valid inference.ModelConfigRequest"),  # a name that is not UTF-8
        (_config("../../etc/passwd"), "invalid model name"),
        (_config("lin\x00ear"), "invalid model name"),
        (_config("x" * 100_000), "the limit is 128"),
        (_config(""), "model name is empty"),
        (_config("linear", "9" * 40), "versions are whole numbers from 1"),
        (_config("linear", "-1"), "versions are whole numbers from 1"),
    ],
)
def test_crafted_model_config_request_gets_invalid_argument(
    channel: grpc.Channel, server: RemoteServer, body: bytes, words: str
) -> None:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig")
    with pytest.raises(grpc.RpcError) as info:
        call(body, timeout=60)
    assert info.value.code() == INVALID, f"{info.value.code()}: {info.value.details()}"
    assert words in info.value.details(), info.value.details()
    assert live(channel) and server.alive()


@pytest.mark.parametrize("compression", [None, grpc.Compression.Gzip])
def test_message_over_the_limit_is_resource_exhausted(channel: grpc.Channel, compression: object) -> None:
    rows = 40 * MiB // 16  # 40 MiB of FP32 (a few KiB gzipped: the limit applies to the inflated message)
    body = request("linear", ("x", "FP32", [rows, 4]), raw=[b"\0" * (rows * 16)]).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        send(channel, body, compression=compression)
    assert info.value.code() == EXHAUSTED, info.value.details()
    assert live(channel)


def test_heavy_decodes_over_the_cap_get_resource_exhausted_with_retry_after(channel: grpc.Channel) -> None:
    rows = (1 << 22) // 4  # 4M typed floats: a quarter of a second or more to convert
    body = _typed(request("reduce", ("x", "FP32", [rows, 4])), "fp32_contents", [0.5] * (rows * 4))

    def call(_: int) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        try:
            send(channel, body)
            return grpc.StatusCode.OK, "", {}
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(call, range(4)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED} and grpc.StatusCode.OK in codes, answers
    for code, details, trailing in answers:
        if code == EXHAUSTED:
            assert trailing.get("retry-after") == "1" and "MAAS_MAX_CONCURRENT_DECODES" in details, (details, trailing)


# -- what clients can hold: bytes in flight, slots to send a message in, connections -------------------------------

BOUNDED_INFLIGHT = 24 * MiB
BOUNDED_MESSAGE = 8 * MiB  # so 3 messages come in at once (the budget over the largest message)
BOUNDED = {
    "MAAS_MAX_INFLIGHT_BYTES": str(BOUNDED_INFLIGHT),
    "MAAS_MAX_REQUEST_BYTES": str(BOUNDED_MESSAGE),
    "MAAS_MAX_CONNECTIONS": "64",
    "MAAS_HEADER_TIMEOUT_S": "2",
    "MAAS_BODY_TIMEOUT_S": "30",
    "MAAS_MAX_CONCURRENT_DECODES": "64",  # no 429s: the budget is under test
}
#: A client's HTTP/2 connection preface and an empty SETTINGS frame: enough for grpc to count it as a connection.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    home = tmp_path_factory.mktemp("grpc-bounded-home")
    models = tmp_path_factory.mktemp("grpc-bounded-models")
    Registry(home=home).register(make_reduce_model(models / "reduce.onnx"), "reduce")
    with RemoteServer(home, env=BOUNDED) as srv:
        yield srv


def _reduce_message(size: int) -> bytes:
    rows = size // 16
    return request("reduce", ("x", "FP32", [rows, 4]), raw=[b"\0" * (rows * 16)]).SerializeToString()


def _call(channel: grpc.Channel, body: bytes) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        send(channel, body)
        return grpc.StatusCode.OK, "", {}
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())


def _grpc_connections(server: RemoteServer) -> int:
    assert server.proc is not None
    conns = psutil.Process(server.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == server.grpc_port and c.status == psutil.CONN_ESTABLISHED)


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout_s`` (what it sends meanwhile is read and dropped)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:  # reset
        pass
    return True


def test_messages_past_the_in_flight_budget_get_unavailable_with_retry_after(bounded: RemoteServer) -> None:
    # REST and gRPC share one budget: three slow REST uploads hold most of it, so a gRPC message over what is left is
    # refused at once (before the model is even looked up), while an empty one still fits.
    body = _reduce_message(4 * MiB)
    holders = []
    with grpc.insecure_channel(bounded.grpc_address) as channel:
        try:
            head = (
                f"POST /v2/models/reduce/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {BOUNDED_MESSAGE}\r\n\r\n"
            )
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", bounded.port), timeout=10)
                s.sendall(head.encode() + b"0" * (BOUNDED_MESSAGE - MiB // 2))
                holders.append(s)
            deadline = time.monotonic() + 10
            while (answer := _call(channel, body))[0] == grpc.StatusCode.OK and time.monotonic() < deadline:
                time.sleep(0.1)  # until the server has read the uploads
            code, details, trailing = answer
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "MAAS_MAX_INFLIGHT_BYTES" in details and trailing.get("retry-after") == "1", (details, trailing)
            assert live(channel)
        finally:
            for s in holders:
                s.close()
        deadline = time.monotonic() + 10
        while (answer := _call(channel, body))[0] != grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer[0] == grpc.StatusCode.OK, f"the budget was not given back: {answer}"


class PeakRss:
    """The server's highest RSS while the block runs, sampled every 5 ms."""

    def __init__(self, server: RemoteServer) -> None:
        assert server.proc is not None
        self.proc = psutil.Process(server.proc.pid)
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_concurrent_large_messages_keep_memory_bounded(bounded: RemoteServer) -> None:
    # grpcio holds a message whole before a handler runs: 48 clients sending 8 MiB at once grew the server by ~300 MiB
    # (each message also copied). Now 3 come in at once and the budget's worth (3) is held, each about 4x while decoded.
    body = _reduce_message(BOUNDED_MESSAGE - 4096)
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]  # a connection each
    channels = [grpc.insecure_channel(bounded.grpc_address, options=options) for _ in range(48)]
    try:
        with PeakRss(bounded) as rss, ThreadPoolExecutor(len(channels)) as pool:
            answers = list(pool.map(lambda ch: _call(ch, body), channels))
    finally:
        for ch in channels:
            ch.close()
    codes = [a[0] for a in answers]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE} and grpc.StatusCode.OK in codes, answers
    for code, details, trailing in answers:
        if code == grpc.StatusCode.UNAVAILABLE:
            assert trailing.get("retry-after") == "1", (details, trailing)
    growth = rss.peak - rss.before
    assert growth < 192 * MiB, f"48 gRPC messages of 8 MiB grew the server by {growth / MiB:.0f} MiB"


def test_refused_messages_are_freed_at_once(bounded: RemoteServer) -> None:
    # grpc keeps an aborted call's exception in a reference cycle; a traceback through the handler kept each refused
    # message (and its parsed copy) alive until a full garbage collection: three bursts of 48 refused 8 MiB messages
    # left the server at 1.4 GB.
    assert bounded.proc is not None
    proc = psutil.Process(bounded.proc.pid)
    body = request("nope", ("x", "FP32", [1, 4]), raw=[b"\0" * (BOUNDED_MESSAGE - 4096)]).SerializeToString()
    with grpc.insecure_channel(bounded.grpc_address, options=[("grpc.max_send_message_length", -1)]) as channel:
        assert _call(channel, body)[0] == grpc.StatusCode.NOT_FOUND  # every path warm before measuring
        before = proc.memory_info().rss
        for _ in range(40):
            assert _call(channel, body)[0] == grpc.StatusCode.NOT_FOUND
    growth = proc.memory_info().rss - before
    assert growth < 64 * MiB, f"40 refused messages of 8 MiB left the server {growth / MiB:.0f} MiB bigger"


def test_silent_connections_are_closed_after_the_header_timeout(bounded: RemoteServer) -> None:
    # A socket that never speaks HTTP/2 holds a descriptor until MAAS_HEADER_TIMEOUT_S, not for ever.
    socks = [socket.create_connection(("127.0.0.1", bounded.grpc_port), timeout=5) for _ in range(5)]
    started = time.monotonic()
    try:
        assert all(_closed_within(s, 8) for s in socks)
        assert time.monotonic() - started < 6
    finally:
        for s in socks:
            s.close()


def test_connections_past_the_cap_are_closed_and_http_stays_live(bounded: RemoteServer) -> None:
    cap = int(BOUNDED["MAAS_MAX_CONNECTIONS"])
    socks = []
    try:
        for _ in range(3 * cap):
            s = socket.create_connection(("127.0.0.1", bounded.grpc_port), timeout=5)
            s.sendall(H2_PREFACE)
            socks.append(s)
        time.sleep(0.5)
        assert _grpc_connections(bounded) <= cap
        assert sum(_closed_within(s, 0) for s in socks) >= 2 * cap  # 0: non-blocking
        assert httpx.get(f"{bounded.url}/v2/health/live", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()
    with grpc.insecure_channel(bounded.grpc_address) as channel:
        assert live(channel), "gRPC did not serve again once the connections closed"


# -- the same bounds on an in-process server, with timeouts too short for a real one ----------------------------------


def _serve_in_process(main: Callable[[str], Awaitable[None]], **bounds: Any) -> None:
    """Run ``main(address)`` (a coroutine function) against ``start_grpc`` with ``bounds``; the RPCs used need no
    engine (ServerLive, and messages that never arrive)."""

    async def run() -> None:
        port = free_port()
        server = await start_grpc(cast(Engine, object()), "127.0.0.1", port, max_message_bytes=MiB, **bounds)
        try:
            await main(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_idle_connections_are_closed() -> None:
    async def main(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            assert (await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())).live
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            started = time.monotonic()
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE
            assert 0.8 < time.monotonic() - started < 5
            # and the next call reconnects, unseen
            assert (await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())).live

    _serve_in_process(main, idle_timeout_s=1.0)


def test_a_stalled_message_frees_its_slot_after_the_body_timeout() -> None:
    # Budget 2 MiB over messages of at most 1 MiB: 2 slots. Two calls that never send their message hold both; a
    # third waits, and is served once the stalled ones are cut off with DEADLINE_EXCEEDED.
    async def main(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            never = asyncio.Event()

            async def nothing() -> AsyncIterator[bytes]:
                await never.wait()
                yield b""

            infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
            stalled = [infer(nothing()) for _ in range(2)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert reply.live and 0.5 < time.monotonic() - started < 4
            for call in stalled:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
                assert "MAAS_BODY_TIMEOUT_S" in (info.value.details() or "")

    _serve_in_process(main, inflight=InflightBytes(2 * MiB), body_timeout_s=1.0, header_timeout_s=5.0)


# -- the decoder, fuzzed in-process ---------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("ids", "INT64", (-1, 3)), TensorSpec("text", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1, 4)),),
)
FUZZ_LIMITS = RequestLimits(max_tensor_elements=1 << 16, max_bytes_elements=256, max_bytes_element_bytes=1024)
CLIENT_CODES = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def _check(message: pb.ModelInferRequest) -> None:
    try:
        decoded = codec.decode_request(message, SIGNATURE, FUZZ_LIMITS)
    except MaasError as exc:
        assert exc.grpc_code in CLIENT_CODES, exc
        return
    for spec in SIGNATURE.inputs:
        arr = decoded.inputs[spec.name]
        sent = next(t for t in message.inputs if t.name == spec.name)
        assert arr.dtype == DATATYPES[spec.datatype] and list(arr.shape) == list(sent.shape)


tensors = st.builds(
    lambda name, datatype, shape: (name, datatype, shape),
    st.sampled_from(["x", "ids", "text", "nope", ""]),
    st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "BF16", ""]),
    st.lists(st.integers(-2, 1 << 40) | st.integers(0, 6), max_size=3),
)


@FUZZ
@given(
    st.lists(tensors, max_size=4),
    st.lists(st.binary(max_size=64), max_size=4),
    st.lists(st.sampled_from(["fp32_contents", "int64_contents", "bytes_contents", "bool_contents"]), max_size=4),
)
def test_fuzzed_messages_decode_or_get_a_client_error(
    inputs: list[tuple[str, str, list[int]]], raw: list[bytes], typed: list[str]
) -> None:
    message = request("m", *inputs, raw=raw)
    for tensor, field in zip(message.inputs, typed, strict=False):
        values = {"bytes_contents": [b"ab", b""], "bool_contents": [True]}.get(field, [1, 2, 3, 4])
        getattr(tensor.contents, field).extend(values)
    _check(message)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzzed_bytes_parse_and_decode_or_get_a_client_error(body: bytes) -> None:
    try:
        message = pb.ModelInferRequest.FromString(body)
    except DecodeError:
        return
    _check(message)


def test_valid_message_decodes(channel: grpc.Channel) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    response = pb.ModelInferResponse.FromString(
        send(channel, request("linear", ("x", "FP32", [2, 4]), raw=[x.tobytes()]).SerializeToString())
    )
    assert response.outputs[0].name == "y" and list(response.outputs[0].shape) == [2, 2]
