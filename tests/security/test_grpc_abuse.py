"""Crafted messages against the gRPC endpoint of a real ``maas serve``: every one gets INVALID_ARGUMENT or
RESOURCE_EXHAUSTED (UNAVAILABLE and 429-like ones with ``retry-after``) with a message naming the problem or the
limit, never INTERNAL, and the server keeps answering. The decoder itself is fuzzed in-process: whatever message
arrives, it returns arrays matching the signature or raises a client error."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas.errors import MaasError
from maas.registry import Registry
from maas.serving.grpc import codec
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.grpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec
from maas.testing.models import make_linear_model, make_text_model
from maas.testing.server import RemoteServer
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
