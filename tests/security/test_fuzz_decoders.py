"""Property-based fuzz of the Open Inference Protocol codec (JSON and the binary tensor extension).

Whatever bytes arrive, ``decode_request`` either returns arrays that match the model's signature or raises
a :class:`MaasError` with a 4xx status; it never raises anything else, and the memory it allocates stays
proportional to the body. ``encode_response`` round-trips through our decoder and ``tritonclient``'s.

Generation is derandomized, so a failure reproduces on every run; hypothesis prints the falsifying body.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maas.errors import MaasError
from maas.serving.api.v2.protocol import DecodedRequest, decode_request, encode_response
from maas.tensors import DATATYPES, Signature, TensorSpec

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLIENT_ERRORS = {400, 413, 415, 429}
MiB = 1024 * 1024


def memory_bound(body: bytes) -> int:
    """The most a decode may allocate: a fixed multiple of the body plus a constant."""
    return 64 * len(body) + 16 * MiB


X = TensorSpec("x", "FP32", (-1, 4))
IDS = TensorSpec("ids", "INT64", (-1, 3))
MASK = TensorSpec("mask", "BOOL", (-1, 3))
TEXT = TensorSpec("text", "BYTES", (-1,))
SIGNATURES: list[Signature] = [
    Signature(inputs=(X,), outputs=(TensorSpec("y", "FP32", (-1, 4)),)),
    Signature(inputs=(IDS,), outputs=(TensorSpec("ids_out", "INT64", (-1, 3)),)),
    Signature(inputs=(MASK,), outputs=(TensorSpec("mask_out", "BOOL", (-1, 3)),)),
    Signature(inputs=(TEXT,), outputs=(TensorSpec("echo", "BYTES", (-1,)), TensorSpec("batch", "INT64", (1,)))),
    # Several inputs, so binary chunks must be split at the right offsets.
    Signature(inputs=(X, IDS, MASK), outputs=(TensorSpec("y", "FP32", (-1, 4)),)),
    # Fully dynamic, once per datatype.
    *(Signature(inputs=(TensorSpec("t", dt, (-1, -1)),), outputs=(TensorSpec("u", dt, (-1, -1)),)) for dt in DATATYPES),
]
signatures = st.sampled_from(SIGNATURES)


# -- the property ------------------------------------------------------------------------------------------------------


def decode_checked(body: bytes, header_length: int | None, signature: Signature) -> DecodedRequest | None:
    """Decode under tracemalloc; assert the outcome is a well-formed request or a 4xx MaasError.

    Returns the request, or None when it was (rightly) refused.
    """
    tracemalloc.start()
    try:
        try:
            decoded = decode_request(body, header_length, signature)
        except MaasError as exc:
            assert exc.http_status in CLIENT_ERRORS, f"{type(exc).__name__} has status {exc.http_status}: {exc}"
            assert str(exc), "an error must say what was wrong"
            decoded = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < memory_bound(body), f"decoding a {len(body)}-byte body allocated {peak:,} bytes at peak"
    if decoded is not None:
        assert_matches_signature(decoded, signature)
    return decoded


def assert_matches_signature(decoded: DecodedRequest, signature: Signature) -> None:
    assert set(decoded.inputs) == {s.name for s in signature.inputs}
    for spec in signature.inputs:
        arr = decoded.inputs[spec.name]
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == DATATYPES[spec.datatype], (spec.name, arr.dtype)
        assert spec.accepts(arr.shape), (spec.name, arr.shape, spec.shape)
        assert arr.flags.c_contiguous and arr.flags.writeable
        if spec.datatype == "BYTES":
            assert all(type(x) is bytes for x in arr.ravel())
    if decoded.requested_outputs is not None:
        assert all(signature.output(n) is not None for n in decoded.requested_outputs)
    assert decoded.binary_outputs <= {s.name for s in signature.outputs}


# -- generators --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written verbatim (NaN, a 5,000-digit integer, ...), which json.dumps cannot produce."""

    text: str


def dumps(value: Any) -> str:
    """JSON with :class:`Raw` tokens spliced in; floats as Python writes them (NaN, Infinity included)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "9" * 5000,
    "-" + "9" * 300,
    "18446744073709551616",
    "-9223372036854775809",
    "1.0",
    "-0",
    "0e0",
]
HUGE_INTS = [2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63, 2**64, 2**70, 10**30]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(RAW_TOKENS).map(Raw),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(0, 5),
    st.sampled_from([0, 1, 2, 3, 4, *HUGE_INTS, -1, -(2**63)]),
    st.integers(-(2**70), 2**70),
)
# A dynamic dimension: mostly small, sometimes far past anything a body could fill.
dynamic_dims = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.sampled_from(HUGE_INTS))
bad_dims = st.one_of(
    st.floats(), st.booleans(), st.text(max_size=3), st.none(), st.lists(st.integers(0, 3), max_size=2)
)


def concrete_shape(spec: TensorSpec, batch: int, free: int) -> list[int]:
    """A shape the spec accepts: ``batch`` for the first dynamic dimension, ``free`` for the others."""
    out: list[int] = []
    for i, d in enumerate(spec.shape):
        out.append(d if d != -1 else (batch if i == 0 else free))
    return out


def valid_array(spec: TensorSpec, shape: list[int]) -> st.SearchStrategy[np.ndarray]:
    if spec.datatype == "BYTES":
        count = math.prod(shape)
        element = st.binary(max_size=8) | st.text(max_size=6).map(lambda s: s.encode())
        return st.lists(element, min_size=count, max_size=count).map(lambda xs: _object_array(xs, shape))
    return hnp.arrays(DATATYPES[spec.datatype], shape)


def _object_array(xs: list[bytes], shape: list[int]) -> np.ndarray:
    arr = np.empty(len(xs), dtype=object)
    arr[:] = xs
    return arr.reshape(shape)


def bytes_wire(arr: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in arr.ravel())


def wire(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return bytes_wire(arr)
    return np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()


def json_data(arr: np.ndarray, nested: bool) -> list[Any]:
    if arr.dtype == object:
        # Only UTF-8 text can travel as a JSON string; other bytes go binary.
        values = [x.decode("utf-8", errors="replace") for x in arr.ravel()]
        return np.array(values, dtype=object).reshape(arr.shape).tolist() if nested and values else values
    return arr.tolist() if nested else arr.ravel().tolist()


@dataclass
class Built:
    """A request body, and the arrays decoding must yield when nothing in it was corrupted."""

    body: bytes
    header_length: int | None
    expected: dict[str, np.ndarray] | None


parameters = st.dictionaries(
    st.sampled_from(
        ["binary_data_size", "binary_data_output", "binary_data", "shared_memory_region", "classification", "x"]
    ),
    json_scalars,
    max_size=3,
)


MUTATIONS = ["name", "datatype", "shape", "dim", "data", "data_value", "size", "params", "drop", "duplicate", "extra"]


@st.composite
def requests(draw: st.DrawFn, signature: Signature, *, valid: bool = False) -> Built:
    """A JSON or binary-extension request for ``signature``, valid or corrupted in one or more places.

    ``valid`` draws only intact requests with small shapes.
    """
    corrupt = draw(st.sets(st.sampled_from(MUTATIONS), max_size=3)) if not valid and draw(st.booleans()) else set()
    batch, free = (
        (draw(st.integers(0, 4)), draw(st.integers(0, 4))) if valid else (draw(dynamic_dims), draw(dynamic_dims))
    )
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    expected: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = concrete_shape(spec, batch, free)
        tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
        if math.prod(shape) > 64 or max(shape, default=0) > 64:
            # Too big to build (or an empty tensor numpy may not represent): claim the shape, send a little data.
            corrupt.add("huge")
            small = draw(valid_array(spec, [draw(st.integers(0, 4))]))
            if draw(st.booleans()):
                raw = wire(small)
                itemsize = DATATYPES[spec.datatype].itemsize
                size = len(raw) if spec.datatype == "BYTES" else math.prod(shape) * itemsize
                tensor["parameters"] = {"binary_data_size": size}
                chunks.append(raw)
            else:
                tensor["data"] = json_data(small, nested=False)
        else:
            arr = draw(valid_array(spec, shape))
            is_utf8 = spec.datatype != "BYTES" or all(_is_utf8(x) for x in arr.ravel())
            if draw(st.booleans()) or not is_utf8:
                raw = wire(arr)
                tensor["parameters"] = {"binary_data_size": len(raw)}
                if "size" in corrupt:
                    tensor["parameters"]["binary_data_size"] = draw(dims | bad_dims)
                if "data" in corrupt:
                    raw = draw(lying_wire(raw, spec.datatype))
                chunks.append(raw)
            else:
                tensor["data"] = json_data(arr, nested=draw(st.booleans()))
                if "data" in corrupt:
                    tensor["data"] = draw(json_values)
                flat = list(np.ravel(np.array(tensor["data"], dtype=object)))
                if "data_value" in corrupt and flat:
                    flat[draw(st.integers(0, len(flat) - 1))] = draw(json_values)
                    tensor["data"] = flat
            expected[spec.name] = arr
        if "name" in corrupt:
            tensor["name"] = draw(st.one_of(st.text(max_size=4), json_scalars))
        if "datatype" in corrupt:
            tensor["datatype"] = draw(st.one_of(st.sampled_from(list(DATATYPES)), st.text(max_size=6), json_scalars))
        if "shape" in corrupt:
            tensor["shape"] = draw(st.one_of(st.lists(dims, max_size=4), json_values))
        if "dim" in corrupt and shape:
            tensor["shape"] = list(shape)
            tensor["shape"][draw(st.integers(0, len(shape) - 1))] = draw(dims | bad_dims)
        if "params" in corrupt:
            tensor["parameters"] = {**tensor.get("parameters", {}), **draw(parameters)}
        tensors.append(tensor)

    if "drop" in corrupt and tensors:
        del tensors[draw(st.integers(0, len(tensors) - 1))]
    if "duplicate" in corrupt and tensors:
        tensors.append(draw(st.sampled_from(tensors)))
    request: dict[str, Any] = {"inputs": draw(st.permutations(tensors)) if len(chunks) == 0 else tensors}
    if not valid and draw(st.booleans()):
        request["id"] = draw(st.text(max_size=8) | json_scalars)
    if not valid and draw(st.booleans()):
        names = st.sampled_from([s.name for s in signature.outputs]) if signature.outputs else st.nothing()
        output = st.fixed_dictionaries({"name": names | st.text(max_size=3)}, optional={"parameters": parameters})
        request["outputs"] = draw(st.lists(output, max_size=3) | json_values)
    if not valid and draw(st.booleans()):
        request["parameters"] = draw(parameters)
    if valid and signature.outputs and draw(st.booleans()):
        # Valid choices of outputs and of binary or JSON for each.
        wanted = draw(st.lists(st.sampled_from([s.name for s in signature.outputs]), unique=True))
        request["outputs"] = [{"name": n, "parameters": {"binary_data": draw(st.booleans())}} for n in wanted]
        request["parameters"] = {"binary_data_output": draw(st.booleans())}
    if "extra" in corrupt:
        request[draw(st.sampled_from(["inputs", "outputs", "parameters", "id", "other"]))] = draw(json_values)

    header = dumps(request).encode()
    body = header + b"".join(chunks)
    header_length: int | None = len(header) if chunks or draw(st.booleans()) else None
    if not valid and draw(st.integers(0, 9)) == 0:
        header_length = draw(st.none() | st.integers(-2, len(body) + 2))
        corrupt.add("header_length")
    clean = not corrupt and (valid or not {"id", "outputs", "parameters"} & set(request))
    return Built(body, header_length, expected if clean else None)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def lying_wire(draw: st.DrawFn, raw: bytes, datatype: str) -> bytes:
    """Binary data that disagrees with its header: truncated, padded, random, or BYTES prefixes that lie."""
    kind = draw(st.sampled_from(["truncate", "pad", "random", "prefix"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "pad":
        return raw + draw(st.binary(min_size=1, max_size=16))
    if kind == "random" or datatype != "BYTES":
        return draw(st.binary(max_size=64))
    count = draw(st.integers(0, 6))
    parts = [
        struct.pack("<I", draw(st.sampled_from([0, 1, 4, 255, 2**31, 2**32 - 1]) | st.integers(0, 40)))
        + draw(st.binary(max_size=8))
        for _ in range(count)
    ]
    return b"".join(parts) + draw(st.binary(max_size=3))


# -- tests -------------------------------------------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=4096), header_length=st.none() | st.integers(-4, 4200), signature=signatures)
def test_arbitrary_bytes_are_refused_cleanly(body: bytes, header_length: int | None, signature: Signature) -> None:
    """Random bytes and header lengths: a well-formed request or a 4xx, never a crash or a memory blow-up."""
    decode_checked(body, header_length, signature)


@FUZZ
@given(
    body=st.one_of(
        json_values.map(lambda v: dumps(v).encode()),
        st.dictionaries(st.sampled_from(["inputs", "outputs", "id", "parameters"]), json_values).map(
            lambda v: dumps(v).encode()
        ),
    ),
    signature=signatures,
)
def test_arbitrary_json_is_refused_cleanly(body: bytes, signature: Signature) -> None:
    """Any JSON document, NaN/Infinity and giant integers included: a well-formed request or a 4xx."""
    decode_checked(body, None, signature)


@FUZZ
@given(data=st.data(), signature=signatures, valid=st.booleans())
def test_structured_requests_decode_or_refuse(data: st.DataObject, signature: Signature, valid: bool) -> None:
    """Requests shaped like real ones, valid or corrupted (shapes, dims, datatypes, values, binary sizes,
    lying BYTES prefixes): a 4xx when corrupted; when intact, exactly the arrays that were sent."""
    built = data.draw(requests(signature, valid=valid))
    decoded = decode_checked(built.body, built.header_length, signature)
    if built.expected is not None:
        assert decoded is not None, "an intact request was refused"
        for name, want in built.expected.items():
            np.testing.assert_array_equal(decoded.inputs[name], want)


def _utf8_roundtrip(arr: np.ndarray, *, binary: bool) -> np.ndarray:
    """What a BYTES tensor reads as after the trip: exact bytes binary, UTF-8 with replacement as JSON."""
    if arr.dtype != object or binary:
        return arr
    return _object_array([x.decode("utf-8", errors="replace").encode() for x in arr.ravel()], list(arr.shape))


@st.composite
def output_sets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=4))
    out: dict[str, np.ndarray] = {}
    for name in names:
        datatype = draw(st.sampled_from(list(DATATYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        out[name] = draw(valid_array(TensorSpec(name, datatype, tuple(shape)), shape))
    return out


@FUZZ
@given(
    outputs=output_sets(),
    binary=st.booleans(),
    pick=st.sets(st.integers(0, 3)),
    request_id=st.none() | st.text(max_size=8),
)
def test_encode_response_round_trips(
    outputs: dict[str, np.ndarray], binary: bool, pick: set[int], request_id: str | None
) -> None:
    """What encode_response writes, our decoder and tritonclient's both read back as the same arrays."""
    names = list(outputs)
    which: set[str] | bool = binary or {names[i] for i in pick if i < len(names)}
    body, headers = encode_response("m", "1", request_id, outputs, which)
    hl_text = headers.get("Inference-Header-Content-Length")
    header_length = int(hl_text) if hl_text is not None else None
    assert headers["Content-Type"] == ("application/json" if header_length is None else "application/octet-stream")
    header = json.loads(body[:header_length] if header_length is not None else body)
    assert header["model_name"] == "m" and header["model_version"] == "1" and header.get("id") == request_id
    assert [t["name"] for t in header["outputs"]] == names

    # Ours: the same tensors sent back as a request's inputs.
    request = dumps({"inputs": header["outputs"]}).encode()
    tail = body[header_length:] if header_length is not None else b""
    signature = Signature(
        inputs=tuple(
            TensorSpec(n, t["datatype"], tuple(-1 for _ in t["shape"]))
            for n, t in zip(names, header["outputs"], strict=True)
        )
    )
    decoded = decode_checked(request + tail, len(request) if tail else None, signature)
    assert decoded is not None, "the decoder refused what the encoder wrote"

    # tritonclient's.
    result = httpclient.InferResult.from_response_body(body, False, header_length)
    for name, arr in outputs.items():
        sent_binary = which is True or (which is not False and name in which)
        want = _utf8_roundtrip(arr, binary=sent_binary)
        np.testing.assert_array_equal(decoded.inputs[name], want)
        theirs = result.as_numpy(name)
        if arr.dtype == object:
            theirs = _object_array([x.encode() if isinstance(x, str) else x for x in theirs.ravel()], list(arr.shape))
        np.testing.assert_array_equal(theirs, want)
        assert theirs.dtype == want.dtype and theirs.shape == want.shape


DYNAMIC_BYTES = Signature(inputs=(TensorSpec("t", "BYTES", (-1, -1)),))
ONLY_TEXT = Signature(inputs=(TEXT,))
ONLY_X = Signature(inputs=(X,))


def _json_body(name: str, datatype: str, shape: list[int], data: bytes) -> bytes:
    return b'{"inputs":[{"name":"%s","datatype":"%s","shape":%s,"data":%s}]}' % (
        name.encode(),
        datatype.encode(),
        json.dumps(shape).encode(),
        data,
    )


# (signature, JSON header, binary tail), built to make the decoder allocate the most per byte of body: up to a
# megabyte, and within the server's default limits (16,384 BYTES elements) so that they decode in full.
AMPLIFIERS: dict[str, tuple[Signature, bytes, bytes]] = {
    "empty nested lists": (
        DYNAMIC_BYTES,
        _json_body("t", "BYTES", [0, 0], b"[" + b",".join([b"[]"] * 300_000) + b"]"),
        b"",
    ),
    "deep nesting": (
        DYNAMIC_BYTES,
        _json_body("t", "BYTES", [0, 0], b"[" * 60 + b",".join([b"[]"] * 100_000) + b"]" * 60),
        b"",
    ),
    "short strings": (
        ONLY_TEXT,
        _json_body("text", "BYTES", [16_000], b"[" + b",".join([b'"ab"'] * 16_000) + b"]"),
        b"",
    ),
    "small floats": (ONLY_X, _json_body("x", "FP32", [50_000, 4], b"[" + b",".join([b"1.5"] * 200_000) + b"]"), b""),
    "empty objects": (ONLY_X, _json_body("x", "FP32", [75_000, 4], b"[" + b",".join([b"{}"] * 300_000) + b"]"), b""),
    "empty BYTES elements": (
        ONLY_TEXT,
        b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[16000],"parameters":{"binary_data_size":64000}}]}',
        b"\0\0\0\0" * 16_000,
    ),
}


@pytest.mark.parametrize("name", list(AMPLIFIERS))
def test_decode_memory_is_proportional_to_body(name: str) -> None:
    """Bodies built for the most allocation per byte (nesting, tiny strings, empty elements) stay in the bound."""
    signature, header, tail = AMPLIFIERS[name]
    decode_checked(header + tail, len(header) if tail else None, signature)
