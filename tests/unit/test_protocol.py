"""The v2 REST codec against the bodies the real ``tritonclient.http`` builds and parses."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from maas.errors import InvalidInput
from maas.serving.api.v2.protocol import DecodedRequest, decode_request, encode_response, model_metadata
from maas.tensors import Signature, TensorSpec

pytestmark = pytest.mark.unit

DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT8", "BOOL", "BYTES"]


def _sample(datatype: str, shape: tuple[int, ...], *, utf8: bool = True, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        words = ["a", "", "héllo", "日本語", "x" * 40, "with space", "\x00nul"]
        raw = [words[i % len(words)].encode() for i in range(n)]
        if not utf8:
            raw = [bytes(rng.integers(0, 256, size=i % 9, dtype=np.uint8)) for i in range(n)]
        arr = np.empty(n, dtype=object)
        arr[:] = raw
        return arr.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    dtype = np.dtype({"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}.get(datatype, datatype.lower()))
    if dtype.kind == "f":
        arr = (rng.standard_normal(n) * 1000).astype(dtype)
        if n >= 4:
            arr[:4] = [np.nan, np.inf, -np.inf, -0.0]
        return arr.reshape(shape)
    info = np.iinfo(dtype)
    arr = rng.integers(info.min, info.max, size=n, dtype=dtype, endpoint=True)
    if n >= 2:
        arr[:2] = [info.min, info.max]
    return arr.reshape(shape)


def _sig(**inputs: str) -> Signature:
    return Signature(
        inputs=tuple(TensorSpec(name, dt, (-1, 4)) for name, dt in inputs.items()),
        outputs=(TensorSpec("out", "FP32", (-1,)), TensorSpec("label", "BYTES", (-1,))),
    )


def _triton_body(
    arrays: dict[str, np.ndarray],
    binary: bool | dict[str, bool],
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    request_id: str = "",
) -> tuple[bytes, int | None]:
    inputs = []
    for name, arr in arrays.items():
        inp = httpclient.InferInput(name, list(arr.shape), _datatype(arr))
        inp.set_data_from_numpy(arr, binary_data=binary if isinstance(binary, bool) else binary[name])
        inputs.append(inp)
    return _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )


def _datatype(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(arr.dtype))


def _assert_decoded(got: np.ndarray, want: np.ndarray) -> None:
    """What a runtime receives: the exact values, in memory it may hand to torch or onnxruntime as is."""
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.aligned
    _assert_same(got, want)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.ravel().tolist() == want.ravel().tolist()
    else:
        np.testing.assert_array_equal(got, want, strict=True)
        # assert_array_equal treats -0.0 == 0.0; the bytes must match too.
        assert got.tobytes() == want.tobytes()


# -- requests built by tritonclient -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_decode_tritonclient_request(datatype: str, batch: int, binary: bool) -> None:
    arr = _sample(datatype, (batch, 4), utf8=not binary)
    body, header_length = _triton_body({"x": arr}, binary)
    assert (header_length is not None) == binary

    req = decode_request(body, header_length, _sig(x=datatype))

    assert list(req.inputs) == ["x"]
    _assert_decoded(req.inputs["x"], arr)
    # tritonclient asks for every output in binary when it names none.
    assert req.requested_outputs is None
    assert req.binary is True


def test_decode_multiple_inputs_mixed_binary_and_json_in_request_order() -> None:
    arrays = {
        "tokens": _sample("INT64", (3, 4), seed=1),
        "pixels": _sample("FP32", (3, 4), seed=2),
        "text": _sample("BYTES", (3, 4), utf8=False, seed=3),
        "mask": _sample("BOOL", (3, 4), seed=4),
    }
    body, header_length = _triton_body(arrays, {"tokens": False, "pixels": True, "text": True, "mask": False})
    sig = _sig(pixels="FP32", text="BYTES", mask="BOOL", tokens="INT64")

    req = decode_request(body, header_length, sig)

    assert list(req.inputs) == list(arrays)
    for name, arr in arrays.items():
        _assert_decoded(req.inputs[name], arr)


def test_decode_empty_batch() -> None:
    for datatype in DATATYPES:
        arr = _sample(datatype, (0, 4))
        for binary in (True, False):
            body, header_length = _triton_body({"x": arr}, binary)
            _assert_decoded(decode_request(body, header_length, _sig(x=datatype)).inputs["x"], arr)


def test_decode_requested_outputs_and_id() -> None:
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False), httpclient.InferRequestedOutput("out")]
    body, header_length = _triton_body({"x": _sample("FP32", (2, 4))}, True, outputs=outputs, request_id="req-7")

    req = decode_request(body, header_length, _sig(x="FP32"))

    assert req.id == "req-7"
    assert req.requested_outputs == ["label", "out"]
    assert req.binary == {"out"}
    assert req.all_binary is False


def test_output_binary_data_overrides_request_binary_data_output() -> None:
    request = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "out", "parameters": {"binary_data": False}}, {"name": "label"}],
        "parameters": {"binary_data_output": True, "custom": 3},
    }
    req = decode_request(json.dumps(request).encode(), None, _sig(x="FP32"))
    assert req.binary == {"label"}
    assert req.parameters == {"binary_data_output": True, "custom": 3}


def test_json_only_request_defaults() -> None:
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    req = decode_request(json.dumps(request).encode(), None, _sig(x="FP32"))
    assert req == DecodedRequest(id=None, inputs=req.inputs, requested_outputs=None)
    assert req.binary == set()


def test_nested_and_flat_json_data_decode_the_same() -> None:
    want = np.arange(12, dtype=np.float32).reshape(3, 4)

    def body(data: Any) -> bytes:
        return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": data}]}).encode()

    sig = _sig(x="FP32")
    for data in (want.ravel().tolist(), want.tolist(), [want.tolist()], want.reshape(2, 6).tolist()):
        _assert_decoded(decode_request(body(data), None, sig).inputs["x"], want)


def test_json_ints_widen_to_float_and_nan_tokens_parse() -> None:
    text = b'{"inputs":[{"name":"x","datatype":"FP16","shape":[1,4],"data":[1,2.5,NaN,-Infinity]}]}'
    got = decode_request(text, None, _sig(x="FP16")).inputs["x"]
    np.testing.assert_array_equal(got, np.array([[1, 2.5, np.nan, -np.inf]], dtype=np.float16))


def test_uint64_full_range_in_json() -> None:
    want = np.array([[0, 1, 2**63, 2**64 - 1]], dtype=np.uint64)
    sig = Signature(inputs=(TensorSpec("x", "UINT64", (1, 4)),))
    for binary in (True, False):
        body, header_length = _triton_body({"x": want}, binary)
        _assert_decoded(decode_request(body, header_length, sig).inputs["x"], want)


# -- responses parsed by tritonclient ---------------------------------------------------------------------------------


def _outputs(batch: int) -> dict[str, np.ndarray]:
    return {dt.lower(): _sample(dt, (batch, 4), seed=i) for i, dt in enumerate(DATATYPES)}


def _parse(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    header_length = headers.get("Inference-Header-Content-Length")
    return httpclient.InferResult.from_response_body(
        body, header_length=None if header_length is None else int(header_length)
    )


@pytest.mark.parametrize("batch", [1, 64])
def test_binary_response_roundtrips_through_tritonclient(batch: int) -> None:
    outputs = _outputs(batch)
    outputs["bytes"] = _sample("BYTES", (batch, 4), utf8=False)

    body, headers = encode_response("digits", "3", "req-1", outputs, True)

    assert headers["Content-Type"] == "application/octet-stream"
    result = _parse(body, headers)
    meta = result.get_response()
    assert (meta["model_name"], meta["model_version"], meta["id"]) == ("digits", "3", "req-1")
    assert [o["name"] for o in meta["outputs"]] == list(outputs)
    for name, arr in outputs.items():
        _assert_same(result.as_numpy(name), arr)


@pytest.mark.parametrize("batch", [1, 64])
def test_json_response_roundtrips_through_tritonclient(batch: int) -> None:
    outputs = _outputs(batch)

    body, headers = encode_response("digits", "3", None, outputs, False)

    assert headers == {"Content-Type": "application/json"}
    assert b" " not in body.split(b'"bytes"')[0]  # compact separators
    result = _parse(body, headers)
    assert "id" not in result.get_response()
    for name, arr in outputs.items():
        got = result.as_numpy(name)
        if arr.dtype == object:
            # JSON carries BYTES as text, which tritonclient hands back as str.
            assert got.ravel().tolist() == [b.decode() for b in arr.ravel()]
            assert got.shape == arr.shape
        else:
            _assert_same(got, arr)


def test_mixed_binary_and_json_outputs() -> None:
    outputs = {"a": _sample("FP32", (2, 4)), "b": _sample("INT8", (2, 4)), "c": _sample("BYTES", (2, 4))}

    body, headers = encode_response("m", "1", None, outputs, {"b", "c"})

    result = _parse(body, headers)
    assert "data" in result.get_output("a") and "parameters" not in result.get_output("a")
    assert result.get_output("b")["parameters"] == {"binary_data_size": 8}
    for name, arr in outputs.items():
        _assert_same(result.as_numpy(name), arr)


def test_json_bytes_output_replaces_invalid_utf8() -> None:
    arr = np.array([b"ok", b"\xff\xfe", "text"], dtype=object)
    body, headers = encode_response("m", "1", None, {"s": arr}, False)
    assert _parse(body, headers).as_numpy("s").tolist() == ["ok", "\ufffd\ufffd", "text"]


def test_str_and_numpy_string_outputs_travel_as_bytes() -> None:
    outputs = {"u": np.array(["héllo", "b"]), "s": np.array([b"x", b"yz"])}
    body, headers = encode_response("m", "1", None, outputs, True)
    result = _parse(body, headers)
    assert result.as_numpy("u").tolist() == ["héllo".encode(), b"b"]
    assert result.as_numpy("s").tolist() == [b"x", b"yz"]


def test_non_native_byte_order_and_non_contiguous_outputs() -> None:
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    outputs = {"be": want.astype(">f4"), "t": want.T.copy().T}
    for binary in (True, False):
        result = _parse(*encode_response("m", "1", None, outputs, binary))
        for name in outputs:
            _assert_same(result.as_numpy(name), want)


def test_model_metadata() -> None:
    sig = Signature(inputs=(TensorSpec("pixels", "FP32", (-1, 64)),), outputs=(TensorSpec("digit", "INT64", (-1,)),))
    assert model_metadata("digits", ["1", "2"], "onnx", sig.inputs, sig.outputs) == {
        "name": "digits",
        "versions": ["1", "2"],
        "platform": "onnx",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "digit", "datatype": "INT64", "shape": [-1]}],
    }


# -- errors -----------------------------------------------------------------------------------------------------------

SIG = Signature(
    inputs=(TensorSpec("pixels", "FP32", (-1, 64)), TensorSpec("ids", "INT8", (-1,))),
    outputs=(TensorSpec("digit", "INT64", (-1,)), TensorSpec("label", "BYTES", (-1,))),
)


def _tensor(name: str = "pixels", **kw: Any) -> dict[str, Any]:
    if name == "ids":
        t: dict[str, Any] = {"datatype": "INT8", "shape": [2], "data": [1, 2]}
    else:
        t = {"datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}
    t.update(name=name, **kw)
    return {k: v for k, v in t.items() if v is not None}


def _fails(request: Any, *words: str, header_length: int | None = None, tail: bytes = b"") -> None:
    body = (request if isinstance(request, bytes) else json.dumps(request).encode()) + tail
    with pytest.raises(InvalidInput) as info:
        decode_request(body, header_length, SIG)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def _req(*tensors: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"inputs": list(tensors) or [_tensor(), _tensor("ids")], **kw}


def test_error_malformed_json() -> None:
    _fails(b'{"inputs": [', "not valid JSON")
    _fails(b"\xff\xfe{}", "not valid UTF-8")
    _fails(b"[" * 100_000 + b"]" * 100_000, "nested too deeply")


def test_error_not_an_object_or_no_inputs() -> None:
    _fails([1, 2], "JSON object", "a list")
    _fails({"id": "x"}, "'inputs'", "none")
    _fails({"inputs": {"pixels": []}}, "'inputs'", "an object")
    _fails({"inputs": [3]}, "inputs[0]", "JSON object")
    _fails(_req(_tensor(name=None)), "inputs[0]", "'name'")


def test_error_wrong_field_types() -> None:
    _fails(_req(id=5), "'id'", "string", "an integer")
    _fails(_req(parameters=[]), "'parameters'", "JSON object")
    _fails(_req(parameters={"binary_data_output": "yes"}), "binary_data_output", "true or false")
    _fails(_req(_tensor(datatype=None), _tensor("ids")), "pixels", "'datatype'", "FP32")
    _fails(_req(_tensor(data={"a": 1}), _tensor("ids")), "pixels", "'data'", "list", "an object")
    _fails(_req(_tensor(data=None), _tensor("ids")), "pixels", "neither 'data' nor")
    _fails(_req(outputs={"digit": {}}), "'outputs'", "list")
    _fails(_req(outputs=[{"name": 3}]), "outputs[0]", "'name'")
    _fails(_req(outputs=[{"name": "digit", "parameters": {"binary_data": 1}}]), "binary_data", "true or false")


def test_error_header_length_out_of_range() -> None:
    body = json.dumps(_req()).encode()
    _fails(body, "Inference-Header-Content-Length", str(len(body) + 1), header_length=len(body) + 1)
    _fails(body, "Inference-Header-Content-Length", "-1", header_length=-1)


def test_error_unknown_input_names_the_models_inputs() -> None:
    _fails(_req(_tensor(), _tensor("ids"), _tensor(name="image")), "no input 'image'", "pixels FP32[-1, 64]", "ids")


def test_error_duplicate_input() -> None:
    _fails(_req(_tensor(), _tensor("ids"), _tensor()), "'pixels'", "more than once")


def test_error_missing_input() -> None:
    _fails(_req(_tensor()), "missing", "ids INT8[-1]")


def test_error_datatype_mismatch_names_both() -> None:
    _fails(_req(_tensor(datatype="FP64"), _tensor("ids")), "'pixels'", "FP64", "expects FP32")


def test_error_unknown_datatype() -> None:
    _fails(_req(_tensor(datatype="BF16"), _tensor("ids")), "unknown datatype 'BF16'", "FP32", "BYTES")


def test_error_shape_not_non_negative_ints() -> None:
    for shape in ([1, -1], [1.0, 64], [True, 64], "1,64", None):
        _fails(_req(_tensor(shape=shape, data=[0.5] * 64), _tensor("ids")), "'pixels'", "non-negative integers")


def test_error_shape_not_accepted() -> None:
    _fails(_req(_tensor(shape=[3, 65], data=[0.5] * 195), _tensor("ids")), "[3, 65]", "expects [-1, 64]")
    _fails(_req(_tensor(shape=[64], data=[0.5] * 64), _tensor("ids")), "[64]", "expects [-1, 64]")


def test_error_element_count_mismatch() -> None:
    _fails(_req(_tensor(data=[0.5] * 63), _tensor("ids")), "'pixels'", "63 data elements", "[1, 64] needs 64")


def test_error_ragged_nested_data() -> None:
    _fails(_req(_tensor(), _tensor("ids", data=[[1], [2, 3]])), "'ids'", "ragged")
    _fails(_req(_tensor(), _tensor("ids", data=[1, [2]])), "'ids'", "ragged")
    _fails(_req(_tensor(), _tensor("ids", data=[[1, [2]], [3, 4]])), "'ids'", "ragged")


@pytest.mark.parametrize(
    ("data", "found"),
    [([1.0, 2], "fraction"), ([True, 2], "booleans"), (["1", 2], "strings"), ([None, 2], "nulls")],
)
def test_error_int_takes_only_json_integers(data: list[Any], found: str) -> None:
    _fails(_req(_tensor(), _tensor("ids", data=data)), "'ids'", "INT8", found, "integers only")


def test_error_int_overflow() -> None:
    _fails(_req(_tensor(), _tensor("ids", data=[1, 128])), "'ids'", "128", "out of range", "INT8 [-128, 127]")
    _fails(_req(_tensor(), _tensor("ids", data=[-129, 1])), "-129", "out of range")
    sig = Signature(inputs=(TensorSpec("u", "UINT64", (-1,)),))
    for value in (-1, 2**64):
        body = json.dumps({"inputs": [{"name": "u", "datatype": "UINT64", "shape": [1], "data": [value]}]})
        with pytest.raises(InvalidInput, match="out of range for UINT64"):
            decode_request(body.encode(), None, sig)


def test_error_fp_rejects_bools_and_strings_and_overflow() -> None:
    _fails(_req(_tensor(data=[True] + [0.5] * 63), _tensor("ids")), "'pixels'", "FP32", "booleans", "JSON numbers")
    _fails(_req(_tensor(data=["0.5"] * 64), _tensor("ids")), "'pixels'", "strings")
    _fails(_req(_tensor(data=[1e39] + [0.5] * 63), _tensor("ids")), "'pixels'", "out of range for FP32")
    _fails(_req(_tensor(data=[10**400] + [0] * 63), _tensor("ids")), "'pixels'", "too large for FP32")


def test_error_bool_takes_only_true_false() -> None:
    sig = Signature(inputs=(TensorSpec("m", "BOOL", (-1,)),))
    for data in ([1, 0], [True, 0], ["true", False]):
        body = json.dumps({"inputs": [{"name": "m", "datatype": "BOOL", "shape": [2], "data": data}]})
        with pytest.raises(InvalidInput, match="BOOL takes only true and false"):
            decode_request(body.encode(), None, sig)


def test_error_bytes_takes_only_strings() -> None:
    sig = Signature(inputs=(TensorSpec("s", "BYTES", (-1,)),))
    body = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]})
    with pytest.raises(InvalidInput, match="BYTES takes strings"):
        decode_request(body.encode(), None, sig)
    body = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]})
    with pytest.raises(InvalidInput, match="lone surrogate"):
        decode_request(body.encode(), None, sig)


def _binary_req(pixels_size: int = 256, ids_size: int = 2) -> tuple[bytes, int]:
    header = json.dumps(
        _req(
            _tensor(data=None, parameters={"binary_data_size": pixels_size}),
            _tensor("ids", data=None, parameters={"binary_data_size": ids_size}),
        )
    ).encode()
    return header, len(header)


def test_binary_hand_built_request() -> None:
    header, n = _binary_req()
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
    req = decode_request(header + pixels.tobytes() + b"\x01\xff", n, SIG)
    _assert_decoded(req.inputs["pixels"], pixels)
    _assert_decoded(req.inputs["ids"], np.array([1, -1], dtype=np.int8))


def test_error_binary_sizes_do_not_add_up_to_body() -> None:
    header, n = _binary_req()
    _fails(header, "258 bytes", "carries 2 bytes", header_length=n, tail=b"\0" * 2)
    _fails(header, "258 bytes", "carries 300 bytes", header_length=n, tail=b"\0" * 300)
    _fails(header, "258 bytes", "carries 0 bytes")  # no Inference-Header-Content-Length at all


def test_error_binary_size_does_not_match_shape() -> None:
    header, n = _binary_req(pixels_size=252, ids_size=6)
    _fails(header, "'pixels'", "252", "64 x 4 = 256", header_length=n, tail=b"\0" * 258)
    for size in (-1, 1.5, "4", True):
        header, n = _binary_req(pixels_size=size)  # type: ignore[arg-type]
        _fails(header, "'pixels'", "binary_data_size", "non-negative integer", header_length=n, tail=b"\0" * 258)


def test_error_binary_and_data_together() -> None:
    request = _req(_tensor(parameters={"binary_data_size": 256}), _tensor("ids"))
    _fails(request, "'pixels'", "both 'data' and binary_data_size")


def test_error_binary_bool_not_zero_or_one() -> None:
    sig = Signature(inputs=(TensorSpec("m", "BOOL", (-1,)),))
    header = json.dumps(
        {"inputs": [{"name": "m", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}]}
    ).encode()
    decode_request(header + b"\x00\x01", len(header), sig)
    with pytest.raises(InvalidInput, match="other than 0 and 1"):
        decode_request(header + b"\x00\x02", len(header), sig)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (struct.pack("<I", 1) + b"a", ["1 BYTES elements", "needs 2"]),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) * 2, ["more than 2", "needs 2"]),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 5) + b"bc", ["declares 5 bytes", "only 2 remain"]),
        (struct.pack("<I", 1) + b"a" + b"\0\0", ["length prefix"]),
    ],
)
def test_error_binary_bytes_framing(payload: bytes, words: list[str]) -> None:
    sig = Signature(inputs=(TensorSpec("s", "BYTES", (-1,)),))
    header = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(payload)}}]}
    ).encode()
    with pytest.raises(InvalidInput) as info:
        decode_request(header + payload, len(header), sig)
    for word in words:
        assert word in str(info.value)


def test_error_unknown_or_duplicate_requested_output() -> None:
    _fails(_req(outputs=[{"name": "digits"}]), "no output 'digits'", "digit INT64[-1]", "label BYTES[-1]")
    _fails(_req(outputs=[{"name": "digit"}, {"name": "digit"}]), "'digit'", "more than once")


def test_error_unsupported_extensions() -> None:
    _fails(
        _req(_tensor(parameters={"shared_memory_region": "r"}), _tensor("ids")), "shared_memory_region", "not supported"
    )
    _fails(_req(outputs=[{"name": "digit", "parameters": {"classification": 3}}]), "classification", "not supported")
