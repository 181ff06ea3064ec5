"""The Open Inference Protocol v2 REST body, with Triton's binary tensor data extension.

Pure functions from bytes to numpy arrays and back, so the router stays thin and the codec is tested
against the real ``tritonclient.http`` without a server.

Wire format of the binary extension: the body starts with a JSON header of
``Inference-Header-Content-Length`` bytes; each tensor carrying ``parameters.binary_data_size`` has
no ``data`` and its raw bytes follow the header, in tensor order. Fixed-size types are little-endian,
row-major; BOOL is one byte per element; BYTES elements are each a 4-byte little-endian length
followed by that many bytes.

Decisions:

- NaN and +-Infinity are written as the bare tokens ``NaN``/``Infinity``/``-Infinity`` (what Python's
  ``json`` and Triton emit). Strict JSON has no such tokens, but ``tritonclient`` parses with
  ``rapidjson``, which accepts them, and so do we on the way in.
- BYTES outputs sent as JSON are decoded as UTF-8 with ``errors="replace"``: JSON strings cannot
  carry arbitrary bytes, so invalid sequences become U+FFFD. Clients that need the exact bytes ask
  for binary output (``tritonclient`` does by default).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maas.errors import InvalidInput
from maas.serving import jsoncodec
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec, datatype_of, format_shape

_JSON_TYPE_NAMES: dict[type, str] = {
    int: "integers",
    float: "numbers with a fraction or exponent",
    bool: "booleans",
    str: "strings",
    type(None): "nulls",
    dict: "objects",
    list: "ragged nested lists",
}

# Which JSON value types each datatype's `data` may hold (bool is a subclass of int, so we compare exact types).
_ALLOWED_JSON_TYPES: dict[str, frozenset[type]] = {
    **{dt: frozenset({int}) for dt in DATATYPES if dt.startswith(("INT", "UINT"))},
    **{dt: frozenset({int, float}) for dt in DATATYPES if dt.startswith("FP")},
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
}

#: Elements converted per C call, so a large tensor never holds the GIL for long (see maas.serving.jsoncodec).
_SLICE = 65_536
_DEFAULT_LIMITS = RequestLimits()

_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")


@dataclass
class DecodedRequest:
    """A validated inference request.

    ``requested_outputs`` is None when the request names no outputs (meaning all of them). Which outputs
    go back as binary: all of them when ``all_binary``, else those in ``binary_outputs``;
    :attr:`binary` gives that in the form :func:`encode_response` takes.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    all_binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary(self) -> set[str] | bool:
        return True if self.all_binary else self.binary_outputs


@dataclass
class _InputHeader:
    spec: TensorSpec
    shape: list[int]
    data: Any
    binary_size: int | None


def decode_request(
    body: bytes, header_length: int | None, signature: Signature, limits: RequestLimits = _DEFAULT_LIMITS
) -> DecodedRequest:
    """Parse and validate an inference request body against ``signature`` within ``limits``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None: the whole body is JSON).
    Returns arrays with the signature's dtype and the request's shape, C-contiguous and writable; BYTES
    as object arrays of ``bytes``. Raises :class:`InvalidInput` saying what was wrong and what was expected,
    or :class:`~maas.errors.PayloadTooLarge` naming the limit a request is over.
    """
    if header_length is None:
        header_length = len(body)
    elif header_length < 0 or header_length > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes; "
            "it must be the length of the JSON header at the start of the body"
        )
    limits.check_json(header_length)
    request = _parse_json(body[:header_length])
    binary = memoryview(body)[header_length:]

    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(request, "the request")
    binary_data_output = _bool_parameter(parameters, "binary_data_output", "the request")

    headers = _input_headers(request, signature, limits)
    requested, binary_outputs = _requested_outputs(request, signature, binary_data_output)
    expected = sum(h.binary_size for h in headers if h.binary_size is not None)
    if expected != len(binary):
        raise InvalidInput(
            f"binary inputs declare {expected} bytes in total (parameters.binary_data_size) but the body carries "
            f"{len(binary)} bytes after the {header_length}-byte JSON header; check Inference-Header-Content-Length "
            "and each input's binary_data_size"
        )

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for h in headers:
        if h.binary_size is None:
            inputs[h.spec.name] = _from_json(h.spec, h.shape, h.data, limits)
        else:
            inputs[h.spec.name] = _from_binary(h.spec, h.shape, binary[offset : offset + h.binary_size], limits)
            offset += h.binary_size
    return DecodedRequest(
        id=request_id,
        inputs=inputs,
        requested_outputs=requested,
        binary_outputs=binary_outputs,
        all_binary=requested is None and binary_data_output,
        parameters=parameters,
    )


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    binary: set[str] | bool,
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers to send with it.

    ``binary`` is True for all outputs binary, else the names of the outputs to send binary. Outputs
    appear in ``outputs``' order. BYTES elements may be ``bytes`` or ``str`` (sent UTF-8 encoded).
    """
    tensors: list[str] = []
    chunks: list[bytes] = []
    for name, value in outputs.items():
        data: str | None = None
        arr = np.asarray(value)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        datatype = datatype_of(arr.dtype)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary is True or (binary is not False and name in binary):
            raw = (
                _bytes_to_wire(arr)
                if datatype == "BYTES"
                else np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
            )
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            data = jsoncodec.dumps_texts([_as_bytes(x).decode("utf-8", errors="replace") for x in arr.ravel()])
        else:
            data = jsoncodec.dumps_flat(arr)
        # Tensor data is spliced in as text encoded in slices: one json.dumps of it all would hold the GIL.
        encoded = json.dumps(tensor, separators=(",", ":"))
        tensors.append(encoded if data is None else f'{encoded[:-1]},"data":{data}}}')

    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response, separators=(",", ":"))
    header = f'{head[:-1]},"outputs":[{",".join(tensors)}]}}'.encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def model_metadata(name: str, versions: Sequence[str], platform: str, signature: Signature) -> dict[str, Any]:
    """The body of ``GET /v2/models/{name}[/versions/{v}]``."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [s.to_dict() for s in signature.inputs],
        "outputs": [s.to_dict() for s in signature.outputs],
    }


# -- the JSON header --------------------------------------------------------------------------------------------------


def _parse_json(header: bytes) -> dict[str, Any]:
    try:
        request = jsoncodec.loads(bytes(header).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidInput(f"request JSON is not valid UTF-8 ({e}); check Inference-Header-Content-Length") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise InvalidInput(f"request body has a value JSON cannot hold: {e}") from None
    except RecursionError:
        raise InvalidInput("request JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise InvalidInput(f"request body must be a JSON object with 'inputs', got {_json_type(request)}")
    return request


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' of {where} must be a JSON object, got {_json_type(parameters)}")
    for key in _UNSUPPORTED_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"parameter '{key}' of {where} is not supported by this server; remove it")
    return parameters


def _bool_parameter(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{key}' of {where} must be true or false, got {_json_type(value)}")
    return value


def _input_headers(request: Mapping[str, Any], signature: Signature, limits: RequestLimits) -> list[_InputHeader]:
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list):
        got = "none" if raw_inputs is None else _json_type(raw_inputs)
        raise InvalidInput(f"request must have 'inputs', a list of tensors; got {got}")
    headers: list[_InputHeader] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInput(f"inputs[{i}] must be a JSON object, got {_json_type(raw)}")
        name = raw.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] must have a string 'name'")
        spec = signature.input(name)
        if spec is None:
            raise InvalidInput(f"model has no input '{name}'; its inputs are {_describe(signature.inputs)}")
        if name in seen:
            raise InvalidInput(f"input '{name}' appears more than once in the request")
        seen.add(name)
        headers.append(_input_header(raw, spec, limits))
    missing = [s for s in signature.inputs if s.name not in seen]
    if missing:
        raise InvalidInput(
            f"request is missing input(s) {_describe(missing)}; the model needs all of {_describe(signature.inputs)}"
        )
    return headers


def _input_header(raw: Mapping[str, Any], spec: TensorSpec, limits: RequestLimits) -> _InputHeader:
    name = spec.name
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input '{name}' must have a string 'datatype'; model expects {spec.datatype}")
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input '{name}' has unknown datatype '{datatype}'; expected one of {', '.join(DATATYPES)} "
            f"(model expects {spec.datatype})"
        )
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{name}' has datatype {datatype}; model expects {spec.datatype} (numpy {DATATYPES[spec.datatype]})"
        )

    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(
            f"input '{name}' shape must be a list of non-negative integers, got {json.dumps(shape)}; "
            f"model expects {format_shape(spec.shape)}"
        )
    count = limits.check_shape(name, shape, datatype)
    if not spec.accepts(shape):
        raise InvalidInput(
            f"input '{name}' has shape {format_shape(shape)}; model expects {format_shape(spec.shape)}"
            + (" (-1 is any size)" if -1 in spec.shape else "")
        )

    parameters = _parameters(raw, f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInput(
                f"input '{name}' binary_data_size must be a non-negative integer, got {json.dumps(size)}"
            )
        if "data" in raw:
            raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size; send one or the other")
        itemsize = DATATYPES[datatype].itemsize
        if datatype != "BYTES" and size != count * itemsize:
            raise InvalidInput(
                f"input '{name}' has binary_data_size {size} bytes; shape {format_shape(shape)} of {datatype} "
                f"needs {count} x {itemsize} = {count * itemsize} bytes"
            )
        return _InputHeader(spec, shape, None, size)
    if "data" not in raw:
        raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if not isinstance(raw["data"], list):
        raise InvalidInput(
            f"input '{name}' 'data' must be a list (flat or nested, row-major), got {_json_type(raw['data'])}"
        )
    return _InputHeader(spec, shape, raw["data"], None)


def _requested_outputs(
    request: Mapping[str, Any], signature: Signature, binary_data_output: bool
) -> tuple[list[str] | None, set[str]]:
    raw_outputs = request.get("outputs")
    if raw_outputs is None or raw_outputs == []:  # an empty list asks for nothing in particular: all, as in Triton
        return None, set()
    if not isinstance(raw_outputs, list):
        raise InvalidInput(f"request 'outputs' must be a list, got {_json_type(raw_outputs)}")
    names: list[str] = []
    binary: set[str] = set()
    for i, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be a JSON object with a string 'name'")
        name = raw["name"]
        if signature.output(name) is None:
            raise InvalidInput(f"model has no output '{name}'; its outputs are {_describe(signature.outputs)}")
        if name in names:
            raise InvalidInput(f"output '{name}' is requested more than once")
        names.append(name)
        parameters = _parameters(raw, f"output '{name}'")
        # An output's own binary_data wins over the request-wide binary_data_output, as in Triton.
        wants_binary = binary_data_output
        if "binary_data" in parameters:
            wants_binary = _bool_parameter(parameters, "binary_data", f"output '{name}'")
        if wants_binary:
            binary.add(name)
    return names, binary


# -- tensor data ------------------------------------------------------------------------------------------------------


def _flatten(name: str, shape: list[int], data: list[Any]) -> list[Any]:
    """The leaves of ``data`` (flat, or nested row-major), converted a slice at a time."""
    if not data or type(data[0]) is not list:
        return data
    flat: list[Any] = []
    inner: tuple[int, ...] | None = None
    step = max(1, _SLICE // max(1, len(data[0])))
    for i in range(0, len(data), step):
        # numpy walks the nesting in C; a ragged level either raises or leaves lists among the leaves.
        try:
            part = np.asarray(data[i : i + step], dtype=object)
        except ValueError:
            part = None
        if part is None or (inner is not None and part.shape[1:] != inner):
            raise InvalidInput(
                f"input '{name}' data is a ragged nested list; send it flat or nested as {format_shape(shape)}"
            )
        inner = part.shape[1:]
        flat.extend(part.reshape(-1).tolist())
    return flat


def _types(flat: list[Any]) -> set[type]:
    types: set[type] = set()
    for i in range(0, len(flat), _SLICE):
        types.update(map(type, flat[i : i + _SLICE]))
    return types


def _from_json(spec: TensorSpec, shape: list[int], data: list[Any], limits: RequestLimits) -> np.ndarray:
    name, datatype = spec.name, spec.datatype
    count = math.prod(shape)
    # Checked before any conversion: the shape is bounded, the data need not be.
    if len(data) > max(count, 1) and type(data[0]) is not list:
        raise InvalidInput(f"input '{name}' has {len(data)} data elements; shape {format_shape(shape)} needs {count}")
    flat = _flatten(name, shape, data)
    types = _types(flat)
    if list in types:
        raise InvalidInput(
            f"input '{name}' data is a ragged nested list; send it flat or nested as {format_shape(shape)}"
        )
    bad = types - _ALLOWED_JSON_TYPES[datatype]
    if bad:
        found = ", ".join(sorted(_JSON_TYPE_NAMES.get(t, t.__name__) for t in bad))
        raise InvalidInput(f"input '{name}' is {datatype} but its data holds {found}; {_expected_values(datatype)}")
    if len(flat) != count:
        raise InvalidInput(f"input '{name}' has {len(flat)} data elements; shape {format_shape(shape)} needs {count}")

    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        try:
            encoded = [s.encode("utf-8") for s in flat]
        except UnicodeEncodeError:
            raise InvalidInput(f"input '{name}' holds a string that is not valid Unicode (a lone surrogate)") from None
        for i, b in enumerate(encoded):
            limits.check_bytes_element(name, i, len(b))
        arr[:] = encoded
        return arr.reshape(shape)
    parts = [_json_slice(name, datatype, dtype, flat[i : i + _SLICE]) for i in range(0, count, _SLICE)]
    arr = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return arr.reshape(shape)


def _json_slice(name: str, datatype: str, dtype: np.dtype[Any], flat: list[Any]) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            culprit = lo if lo < info.min else hi
            raise InvalidInput(
                f"input '{name}' value {culprit} is out of range for {datatype} [{info.min}, {info.max}]"
            )
        return np.array(flat, dtype=dtype)
    if dtype.kind == "f":
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:
            raise InvalidInput(f"input '{name}' holds an integer too large for {datatype}") from None
        with np.errstate(over="ignore"):
            arr = wide.astype(dtype)
        if dtype != wide.dtype and np.any(np.isinf(arr) & np.isfinite(wide)):
            raise InvalidInput(
                f"input '{name}' holds values out of range for {datatype} (max {float(np.finfo(dtype).max)})"
            )
        return arr
    return np.array(flat, dtype=dtype)


def _from_binary(spec: TensorSpec, shape: list[int], raw: memoryview, limits: RequestLimits) -> np.ndarray:
    name, datatype = spec.name, spec.datatype
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_wire(name, raw, count, limits).reshape(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL" and count and np.frombuffer(raw, dtype=np.uint8).max() > 1:
        raise InvalidInput(f"input '{name}' is BOOL but its binary data holds bytes other than 0 and 1")
    # A copy, so the array owns aligned, writable memory rather than pinning the read-only request body.
    arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count).astype(dtype, copy=True)
    return arr.reshape(shape)


def _bytes_from_wire(name: str, raw: memoryview, count: int, limits: RequestLimits) -> np.ndarray:
    elements: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"input '{name}' BYTES binary data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input '{name}' BYTES element {len(elements)} declares {length} bytes but only {end - offset} remain"
            )
        limits.check_bytes_element(name, len(elements), length)
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
        if len(elements) > count:
            break
    if len(elements) != count:
        found = f"more than {count}" if len(elements) > count else str(len(elements))
        raise InvalidInput(
            f"input '{name}' binary data holds {found} BYTES "
            f"elements; its shape needs {count} (each a 4-byte little-endian length, then the bytes)"
        )
    arr = np.empty(count, dtype=object)
    arr[:] = elements
    return arr


def _bytes_to_wire(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for x in arr.ravel():
        b = _as_bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    # Mirrors tritonclient.utils.serialize_byte_tensor: anything else travels as its UTF-8 text.
    return str(x).encode("utf-8")


# -- messages ---------------------------------------------------------------------------------------------------------


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.describe() for s in specs) or "(none)"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _expected_values(datatype: str) -> str:
    if datatype == "BOOL":
        return "BOOL takes only true and false"
    if datatype == "BYTES":
        return "BYTES takes strings (send raw bytes as binary data)"
    if datatype.startswith("FP"):
        return f"{datatype} takes JSON numbers"
    return f"{datatype} takes JSON integers only"
