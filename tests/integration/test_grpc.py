"""The real server's gRPC endpoint (inference.GRPCInferenceService) against the unmodified tritonclient.grpc, and
against our own stubs for what tritonclient never sends (typed contents, malformed raw data)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from maas import __version__
from maas.errors import InvalidInput, MaasError, NotFound, PayloadTooLarge, RateLimited, Unavailable
from maas.registry import Registry
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.grpc.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from maas.serving.grpc.server import start_grpc
from maas.serving.limits import RequestLimits
from maas.testing.models import make_identity_model, make_linear_model, make_multi_io_model, make_text_model
from maas.testing.server import RemoteServer, free_port
from tests.integration.conftest import multi_io_inputs

MiB = 1024 * 1024
BATCHES = [1, 2, 7, 33, 64]
#: The deployment of the `batched` model (a copy of `linear`), which its ModelConfig must show.
BATCHED: dict[str, Any] = {"max_batch_size": 16, "max_queue_delay_ms": 2, "preferred_batch_sizes": [4, 8]}
BATCHED |= {"max_queue_size": 100, "instances": 2, "threads": 1}
MULTI_TYPES = {"x": "FP32", "ids": "INT64", "mask": "BOOL"}
#: Every fixed-size datatype, served by an identity model of its own (BYTES: the `text` model).
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
#: Typed contents field of each datatype (FP16 has none).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def sample(datatype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values spanning the datatype's range (floats include NaN, infinities and -0.0), so every byte counts."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    arr = (rng.standard_normal(shape) * 1e3).astype(dtype)
    flat = arr.reshape(-1)
    flat[: min(4, flat.size)] = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype)[: min(4, flat.size)]
    return arr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, dict[str, Path]]]:
    home = tmp_path_factory.mktemp("grpc-home")
    models = tmp_path_factory.mktemp("grpc-models")
    files = {
        "multi": make_multi_io_model(models / "multi.onnx", scale=3.0),
        "linear": make_linear_model(models / "linear.onnx"),
        "batched": make_linear_model(models / "batched.onnx"),
        "text": make_text_model(models / "text.onnx"),
        **{f"id_{d.lower()}": make_identity_model(models / f"id_{d.lower()}.onnx", d) for d in DATATYPES},
    }
    reg = Registry(home=home)
    for name, path in files.items():
        reg.register(path, name)
    reg.deploy("batched", **BATCHED)
    with RemoteServer(home, env={"MAAS_MAX_REQUEST_BYTES": str(MiB)}) as server:
        yield server, files


@pytest.fixture(scope="module")
def client(served: tuple[RemoteServer, dict[str, Path]]) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(served[0].grpc_address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served: tuple[RemoteServer, dict[str, Path]]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served[0].grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def infer_inputs(feeds: dict[str, np.ndarray], types: dict[str, str]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, arr in feeds.items():
        inp = grpcclient.InferInput(name, list(arr.shape), types[name])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def assert_status(exc: InferenceServerException | grpc.RpcError, code: grpc.StatusCode, words: str) -> None:
    if isinstance(exc, InferenceServerException):
        status, message = exc.status(), exc.message()
    else:
        status, message = str(exc.code()), exc.details()
    assert status == str(code), f"{status}: {message}"
    assert words in message, message


# -- health and metadata ----------------------------------------------------------------------------------------------


def test_server_live_ready_and_model_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("multi") and client.is_model_ready("linear", "1")
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("nope")
    assert_status(info.value, grpc.StatusCode.NOT_FOUND, "nope")
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("linear", "9")
    assert_status(info.value, grpc.StatusCode.NOT_FOUND, "9")


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "maas" and meta.version == __version__
    assert list(meta.extensions) == ["binary_tensor_data"]


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    for version in ("", "1"):
        meta = client.get_model_metadata("multi", version, as_json=True)
        assert meta["name"] == "multi" and meta["versions"] == ["1"] and meta["platform"] == "onnx"
        # MessageToJson writes int64 as strings.
        assert meta["inputs"] == [
            {"name": "x", "datatype": "FP32", "shape": ["-1", "4"]},
            {"name": "ids", "datatype": "INT64", "shape": ["-1", "3"]},
            {"name": "mask", "datatype": "BOOL", "shape": ["-1", "3"]},
        ]
        assert [o["name"] for o in meta["outputs"]] == ["y", "ids_out", "mask_out"]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert_status(info.value, grpc.StatusCode.NOT_FOUND, "nope")


# -- Triton's model configuration (ModelConfig) ----------------------------------------------------------------------


def test_our_messages_are_tritons_on_the_wire() -> None:
    """Every message, field and enum value of our .proto has the name, number and type it has in tritonclient's own
    compiled protos, so each side reads the other's bytes as they were meant."""
    pool = model_config_pb2.DESCRIPTOR.pool
    assert pool is service_pb2.DESCRIPTOR.pool

    def same(ours: Any) -> None:
        theirs = pool.FindMessageTypeByName(ours.full_name)
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated)
            if field.message_type is not None:
                assert field.message_type.full_name == other.message_type.full_name, field.full_name
            if field.enum_type is not None:
                values = {v.name: v.number for v in field.enum_type.values}
                assert values == {v.name: v.number for v in other.enum_type.values}, field.enum_type.full_name
        for nested in ours.nested_types:
            same(nested)

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        same(message)
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        other = theirs[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


@pytest.mark.parametrize(("name", "version"), [("batched", ""), ("linear", "1"), ("multi", ""), ("text", "")])
def test_model_config_equals_rest(
    served: tuple[RemoteServer, dict[str, Path]], client: grpcclient.InferenceServerClient, name: str, version: str
) -> None:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/config"
    rest = httpx.get(served[0].url + path, timeout=30).raise_for_status().json()
    got = client.get_model_config(name, version).config
    assert got == json_format.ParseDict(rest, model_config_pb2.ModelConfig())


def test_model_config_shows_the_deployment(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("batched").config
    assert config.name == "batched" and config.platform == "onnx"
    assert list(config.version_policy.specific.versions) == [1]
    assert config.max_batch_size == 16
    # With a batch dimension, dims leave it out (as in Triton): x is [-1, 4], y is [-1, 2].
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", model_config_pb2.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("y", model_config_pb2.TYPE_FP32, [2])]
    [group] = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8] and batching.max_queue_delay_microseconds == 2000
    assert batching.default_queue_policy.max_queue_size == 100
    assert config.parameters["threads"].string_value == "1"
    # No batch dimension: max_batch_size 0, dims are the whole shape; BYTES is Triton's TYPE_STRING.
    text = client.get_model_config("text").config
    assert text.max_batch_size == 0 and not text.HasField("dynamic_batching")
    assert [(t.data_type, list(t.dims)) for t in text.input] == [(model_config_pb2.TYPE_STRING, [-1])]


@pytest.mark.parametrize(
    ("name", "version", "code", "words"),
    [
        ("nope", "", grpc.StatusCode.NOT_FOUND, "nope"),
        ("linear", "9", grpc.StatusCode.NOT_FOUND, "9"),
        ("linear", "abc", grpc.StatusCode.INVALID_ARGUMENT, "version"),
        ("bad..name", "", grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ],
)
def test_model_config_errors(
    client: grpcclient.InferenceServerClient, name: str, version: str, code: grpc.StatusCode, words: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config(name, version)
    assert_status(info.value, code, words)


# -- inference with tritonclient (raw contents) -----------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_tritonclient_equals_onnxruntime(
    served: tuple[RemoteServer, dict[str, Path]], client: grpcclient.InferenceServerClient, batch: int
) -> None:
    feeds = multi_io_inputs(batch)
    expected = reference(served[1]["multi"], feeds)
    result = client.infer("multi", infer_inputs(feeds, MULTI_TYPES), request_id=f"req-{batch}")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("multi", "1", f"req-{batch}")
    assert [o.name for o in response.outputs] == list(expected)
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_like_onnxruntime(
    served: tuple[RemoteServer, dict[str, Path]], client: grpcclient.InferenceServerClient, datatype: str, batch: int
) -> None:
    name = f"id_{datatype.lower()}"
    x = sample(datatype, (batch, 3), seed=batch)
    want = reference(served[1][name], {"x": x})["y"]
    result = client.infer(name, infer_inputs({"x": x}, {"x": datatype}))
    got = result.as_numpy("y")
    assert result.get_output("y").datatype == datatype
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit: NaN payloads and -0.0 too


@pytest.mark.parametrize("batch", BATCHES)
def test_bytes_tensors_round_trip(client: grpcclient.InferenceServerClient, batch: int) -> None:
    texts = np.array([f"text {i} wörld".encode() if i % 3 else b"" for i in range(batch)], dtype=object)
    result = client.infer("text", infer_inputs({"text": texts}, {"text": "BYTES"}))
    assert result.as_numpy("echo").tolist() == texts.tolist()
    assert result.as_numpy("batch").tolist() == [batch]


def test_requested_outputs_only(client: grpcclient.InferenceServerClient) -> None:
    feeds = multi_io_inputs(3)
    outputs = [grpcclient.InferRequestedOutput("mask_out")]
    result = client.infer("multi", infer_inputs(feeds, MULTI_TYPES), outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["mask_out"]
    np.testing.assert_array_equal(result.as_numpy("mask_out"), ~feeds["mask"])
    assert result.get_response().id == ""


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    served: tuple[RemoteServer, dict[str, Path]], client: grpcclient.InferenceServerClient, algorithm: str
) -> None:
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    want = reference(served[1]["linear"], {"x": x})["y"]
    result = client.infer("linear", infer_inputs({"x": x}, {"x": "FP32"}), compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("y"), want)


# -- typed contents (our stub: tritonclient always sends raw) ---------------------------------------------------------


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    out = response.outputs[index]
    dtype = triton_to_np_dtype(out.datatype)
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(out.shape))


def test_typed_contents_equal_onnxruntime(
    served: tuple[RemoteServer, dict[str, Path]], stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    feeds = multi_io_inputs(5)
    expected = reference(served[1]["multi"], feeds)
    request = pb.ModelInferRequest(model_name="multi", model_version="1", id="typed")
    for name, field in (("x", "fp32_contents"), ("ids", "int64_contents"), ("mask", "bool_contents")):
        tensor = request.inputs.add(name=name, datatype=MULTI_TYPES[name], shape=feeds[name].shape)
        getattr(tensor.contents, field).extend(feeds[name].ravel().tolist())
    response = stub.ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("multi", "1", "typed")
    for name, want in expected.items():
        np.testing.assert_array_equal(output_array(response, name), want)


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_contents_of_every_datatype(
    served: tuple[RemoteServer, dict[str, Path]], stub: pb_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    name = f"id_{datatype.lower()}"
    x = sample(datatype, (4, 3), seed=7)
    request = pb.ModelInferRequest(model_name=name)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=x.shape)
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(x.ravel().tolist())
    got = output_array(stub.ModelInfer(request), "y")
    assert got.tobytes() == reference(served[1][name], {"x": x})["y"].tobytes()


def test_typed_bytes_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="text")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[3])
    tensor.contents.bytes_contents.extend([b"a", b"", b"\xc3\xa9"])
    response = stub.ModelInfer(request)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("echo", "BYTES", [3]),
        ("batch", "INT64", [1]),
    ]
    assert response.raw_output_contents[0] == b"\x01\x00\x00\x00a" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


def test_fp16_has_no_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="id_fp16")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents")


# -- errors -----------------------------------------------------------------------------------------------------------


def _x(shape: list[int], datatype: str = "FP32", name: str = "x") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, shape, datatype)
    inp.set_data_from_numpy(np.ones(shape, dtype=triton_to_np_dtype(datatype)))
    return inp


@pytest.mark.parametrize(
    ("model", "version", "inputs", "outputs", "code", "words"),
    [
        ("linear", "", [_x([1, 4], "INT64")], None, grpc.StatusCode.INVALID_ARGUMENT, "model expects FP32"),
        ("linear", "", [_x([1, 5])], None, grpc.StatusCode.INVALID_ARGUMENT, "[-1, 4]"),
        ("linear", "", [_x([4])], None, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ("linear", "", [_x([1, 4], name="pixels")], None, grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
        ("linear", "", [_x([1, 4]), _x([1, 4])], None, grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        ("multi", "", [_x([1, 4])], None, grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) ids INT64[-1, 3]"),
        ("linear", "", [], None, grpc.StatusCode.INVALID_ARGUMENT, "missing input"),
        ("linear", "", [_x([1, 4])], ["zz"], grpc.StatusCode.INVALID_ARGUMENT, "no output 'zz'"),
        ("nope", "", [_x([1, 4])], None, grpc.StatusCode.NOT_FOUND, "nope"),
        ("linear", "9", [_x([1, 4])], None, grpc.StatusCode.NOT_FOUND, "9"),
        ("linear", "abc", [_x([1, 4])], None, grpc.StatusCode.INVALID_ARGUMENT, "version"),
        ("bad..name", "", [_x([1, 4])], None, grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ],
)
def test_bad_requests_get_their_status_and_a_clear_message(
    served: tuple[RemoteServer, dict[str, Path]],
    client: grpcclient.InferenceServerClient,
    model: str,
    version: str,
    inputs: list[grpcclient.InferInput],
    outputs: list[str] | None,
    code: grpc.StatusCode,
    words: str,
) -> None:
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, model_version=version, outputs=requested)
    assert_status(info.value, code, words)
    assert client.is_server_live() and served[0].alive()


def test_message_over_the_limit_is_resource_exhausted(client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((70_000, 4), np.float32)  # 1.1 MB; the server takes 1 MiB
    with pytest.raises(InferenceServerException) as info:
        client.infer("linear", infer_inputs({"x": x}, {"x": "FP32"}))
    assert info.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED), info.value.message()
    assert client.is_server_live()


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([b"abc"], "3 bytes in raw_input_contents[0]; shape [1, 4] of FP32 needs 4 x 4 = 16 bytes"),
        ([b"\0" * 20], "20 bytes"),
        ([b"\0" * 16, b"\0" * 16], "raw_input_contents has 2 entries but the request has 1 inputs"),
    ],
)
def test_garbage_raw_sizes_are_invalid_argument(
    stub: pb_grpc.GRPCInferenceServiceStub, raw: list[bytes], words: str
) -> None:
    request = pb.ModelInferRequest(model_name="linear", raw_input_contents=raw)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, words)


# -- error mapping and binding, on an in-process server over an engine that fails on purpose -------------------------


class FailingEngine:
    """Raises ``exc`` from every engine call the servicer makes (no real engine fails on demand)."""

    limits = RequestLimits()

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def server_ready(self) -> tuple[bool, str]:
        raise self.exc

    async def infer(self, *args: object, **kw: object) -> None:
        raise self.exc


def call_in_process(engine: object, port: int) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Code, details and trailing metadata of ServerReady and ModelInfer on ``engine`` (both must agree)."""

    async def main() -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
        server = await start_grpc(engine, "127.0.0.1", port, max_message_bytes=MiB)  # type: ignore[arg-type]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as ready:
                    await stub.ServerReady(pb.ServerReadyRequest())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name="linear"))
                assert ready.value.code() == info.value.code()
                error = info.value
                return error.code(), error.details(), tuple(error.trailing_metadata())
        finally:
            await server.stop(None)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("exc", "code", "words", "retry"),
    [
        (
            InvalidInput("bad file /home/someone/models/x.onnx"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad file <path>",
            False,
        ),
        (NotFound("model 'zz' is not registered"), grpc.StatusCode.NOT_FOUND, "'zz'", False),
        (PayloadTooLarge("over MAAS_MAX_OUTPUT_BYTES"), grpc.StatusCode.RESOURCE_EXHAUSTED, "MAAS_MAX_OUTPUT", False),
        (RateLimited("decoding already"), grpc.StatusCode.RESOURCE_EXHAUSTED, "decoding already", True),
        (Unavailable("models:/linear/1 is loading"), grpc.StatusCode.UNAVAILABLE, "loading", True),
        (MaasError("a plain MaasError is a bug"), grpc.StatusCode.INTERNAL, "request id", False),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, "request id", False),
    ],
)
def test_errors_map_to_statuses(
    exc: Exception, code: grpc.StatusCode, words: str, retry: bool, caplog: pytest.LogCaptureFixture
) -> None:
    got, details, trailing = call_in_process(FailingEngine(exc), free_port())
    assert got == code and words in details, details
    assert (("retry-after", "1") in trailing) == retry, trailing
    if code == grpc.StatusCode.INTERNAL:
        assert str(exc) not in details
        assert any(r.exc_info and r.exc_info[1] is exc for r in caplog.records)  # logged in full


def test_a_port_in_use_is_a_clear_error(served: tuple[RemoteServer, dict[str, Path]]) -> None:
    async def main() -> None:
        await start_grpc(FailingEngine(RuntimeError()), "127.0.0.1", served[0].grpc_port, max_message_bytes=MiB)  # type: ignore[arg-type]

    with pytest.raises(OSError, match="--grpc-port"):
        asyncio.run(main())
