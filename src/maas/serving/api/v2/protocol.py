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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from maas.errors import InvalidInput, PayloadTooLarge
from maas.serving import jsoncodec, validation
from maas.serving.api.v2 import tensor_data
from maas.serving.api.v2.tensor_data import json_type
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec, datatype_of, format_shape

_DEFAULT_LIMITS = RequestLimits()
#: A request id is echoed in the response; an identifier needs no more.
MAX_ID_CHARS = 1024

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
        raise InvalidInput(f"request 'id' must be a string, got {json_type(request_id)}")
    if request_id is not None and len(request_id) > MAX_ID_CHARS:
        raise InvalidInput(f"request 'id' has {len(request_id):,} characters; at most {MAX_ID_CHARS} are echoed back")
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
            inputs[h.spec.name] = tensor_data.from_json(h.spec, h.shape, h.data, limits)
        else:
            inputs[h.spec.name] = tensor_data.from_binary(
                h.spec, h.shape, binary[offset : offset + h.binary_size], limits
            )
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
    max_bytes: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers to send with it.

    ``binary`` is True for all outputs binary, else the names of the outputs to send binary. Outputs
    appear in ``outputs``' order. BYTES elements may be ``bytes`` or ``str`` (sent UTF-8 encoded).
    ``max_bytes`` bounds the body (JSON text as it is encoded, binary data by its size): a response over it
    raises :class:`~maas.errors.PayloadTooLarge` before more than that is built.
    """
    budget = jsoncodec.Budget(max_bytes)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    # The body is a list of pieces joined once at the end: tensor data is encoded in slices (one json.dumps of
    # it all would hold the GIL), and no intermediate copy of a large response is ever made.
    head: list[bytes] = [_dumps(response)[:-1], b',"outputs":[']
    chunks: list[bytes] = []
    try:
        for i, (name, value) in enumerate(outputs.items()):
            arr = np.asarray(value)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            datatype = datatype_of(arr.dtype)
            tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
            data: list[bytes] | None = None
            if binary is True or (binary is not False and name in binary):
                raw = (
                    tensor_data.bytes_to_wire(arr)
                    if datatype == "BYTES"
                    else np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
                )
                budget.spend(len(raw))
                tensor["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            elif datatype == "BYTES":
                data = jsoncodec.dumps_texts(map(tensor_data.as_bytes, arr.ravel()), budget)
            else:
                data = jsoncodec.dumps_flat(arr, budget)
            encoded = _dumps(tensor)
            head.append(b"," if i else b"")
            if data is None:
                head.append(encoded)
            else:
                head += [encoded[:-1], b',"data":', *data, b"}"]
    except jsoncodec.OverBudget:
        raise PayloadTooLarge(
            f"the response would be over {max_bytes:,} bytes (MAAS_MAX_OUTPUT_BYTES; JSON output counts as "
            "encoded, about 20 bytes a number); ask for binary outputs, fewer outputs or smaller batches"
        ) from None
    head.append(b"]}")
    header_length = sum(len(p) for p in head)
    body = b"".join(head + chunks)
    if not chunks:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. an id with a lone surrogate, which the standard library escapes
        return json.dumps(obj, separators=(",", ":")).encode()


def model_metadata(
    name: str, versions: Sequence[str], platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> dict[str, Any]:
    """The body of ``GET /v2/models/{name}[/versions/{v}]``."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
    }


# -- the JSON header --------------------------------------------------------------------------------------------------


def _parse_json(header: bytes) -> dict[str, Any]:
    try:
        request = jsoncodec.loads(bytes(header))
    except UnicodeDecodeError as e:
        raise InvalidInput(f"request JSON is not valid UTF-8 ({e}); check Inference-Header-Content-Length") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise InvalidInput(f"request body has a value JSON cannot hold: {e}") from None
    except RecursionError:
        raise InvalidInput("request JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise InvalidInput(f"request body must be a JSON object with 'inputs', got {json_type(request)}")
    return request


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' of {where} must be a JSON object, got {json_type(parameters)}")
    for key in _UNSUPPORTED_PARAMETERS:
        if key in parameters:
            raise InvalidInput(f"parameter '{key}' of {where} is not supported by this server; remove it")
    return parameters


def _bool_parameter(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{key}' of {where} must be true or false, got {json_type(value)}")
    return value


def _input_headers(request: Mapping[str, Any], signature: Signature, limits: RequestLimits) -> list[_InputHeader]:
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list):
        got = "none" if raw_inputs is None else json_type(raw_inputs)
        raise InvalidInput(f"request must have 'inputs', a list of tensors; got {got}")
    headers: list[_InputHeader] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInput(f"inputs[{i}] must be a JSON object, got {json_type(raw)}")
        name = raw.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] must have a string 'name'")
        spec = validation.input_spec(signature, name, seen)
        seen.add(name)
        headers.append(_input_header(raw, spec, limits))
    validation.check_complete(signature, seen)
    return headers


def _input_header(raw: Mapping[str, Any], spec: TensorSpec, limits: RequestLimits) -> _InputHeader:
    name = spec.name
    datatype, shape, count = validation.check_input(spec, raw.get("datatype"), raw.get("shape"), limits)

    parameters = _parameters(raw, f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInput(
                f"input '{name}' binary_data_size must be a non-negative integer, got {validation.brief(size)}"
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
            f"input '{name}' 'data' must be a list (flat or nested, row-major), got {json_type(raw['data'])}"
        )
    return _InputHeader(spec, shape, raw["data"], None)


def _requested_outputs(
    request: Mapping[str, Any], signature: Signature, binary_data_output: bool
) -> tuple[list[str] | None, set[str]]:
    raw_outputs = request.get("outputs")
    if raw_outputs is None or raw_outputs == []:  # an empty list asks for nothing in particular: all, as in Triton
        return None, set()
    if not isinstance(raw_outputs, list):
        raise InvalidInput(f"request 'outputs' must be a list, got {json_type(raw_outputs)}")
    names: list[str] = []
    binary: set[str] = set()
    for i, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be a JSON object with a string 'name'")
        name = raw["name"]
        validation.output_spec(signature, name, names)
        names.append(name)
        parameters = _parameters(raw, f"output '{name}'")
        # An output's own binary_data wins over the request-wide binary_data_output, as in Triton.
        wants_binary = binary_data_output
        if "binary_data" in parameters:
            wants_binary = _bool_parameter(parameters, "binary_data", f"output '{name}'")
        if wants_binary:
            binary.add(name)
    return names, binary
