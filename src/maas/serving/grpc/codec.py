"""``inference.ModelInferRequest`` to the engine's :class:`~maas.serving.engine.types.InferRequest`, and its
:class:`~maas.serving.engine.types.InferResponse` back to an ``inference.ModelInferResponse``.

An input's data comes either as raw bytes (``raw_input_contents``, one entry per input in input order; what
``tritonclient.grpc`` sends) or in the typed ``contents`` field of its datatype; a request uses one form for all
of its inputs or the other, never both, as in Triton. Raw data is little-endian and row-major; BYTES elements are
each a 4-byte little-endian length and then the bytes (the same layout as the REST binary extension, decoded by the
same functions). FP16 has no typed field and travels raw only. Every tensor is checked from its header (name,
datatype, shape; :mod:`maas.serving.validation` and the request limits) before its data is read. Outputs always
go back as ``raw_output_contents``, which is what ``tritonclient.grpc``'s ``as_numpy`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maas.errors import InvalidInput
from maas.serving import validation
from maas.serving.api.v2.protocol import MAX_ID_CHARS
from maas.serving.api.v2.tensor_data import bytes_to_wire, from_binary
from maas.serving.engine.types import InferRequest, InferResponse
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec, datatype_of, format_shape

#: Parameters of Triton features this server does not have; a request naming one is refused, not half-served.
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")

#: The typed ``contents`` field of each datatype, and the numpy dtype of that field's elements.
CONTENTS_FIELD: dict[str, tuple[str, np.dtype[Any]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(np.object_)),
}

#: Elements converted per C call, so no single call holds the GIL for long.
_SLICE = 65_536


def decode_request(request: pb.ModelInferRequest, signature: Signature, limits: RequestLimits) -> InferRequest:
    """The validated inputs, requested outputs, id and parameters of ``request`` for a model of ``signature``.

    Arrays have the signature's dtype and the request's shape, C-contiguous and writable; BYTES are object arrays
    of ``bytes``. Raises :class:`~maas.errors.InvalidInput` saying what was wrong and what was expected, or
    :class:`~maas.errors.PayloadTooLarge` naming the limit the request is over.
    """
    request_id = request.id
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidInput(f"request 'id' has {len(request_id):,} characters; at most {MAX_ID_CHARS} are echoed back")
    parameters = _parameters(request.parameters, "the request")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs; send one "
            "entry per input, in the order of 'inputs' (or none, with each input's data in its typed 'contents')"
        )
    # Every header first: a bad name, datatype or shape anywhere is refused before any data is converted.
    headers: list[tuple[TensorSpec, list[int], int]] = []
    seen: set[str] = set()
    for tensor in request.inputs:
        spec = validation.input_spec(signature, tensor.name, seen)
        seen.add(tensor.name)
        _parameters(tensor.parameters, f"input '{tensor.name}'")
        _, shape, count = validation.check_input(spec, tensor.datatype, list(tensor.shape), limits)
        if raw and tensor.HasField("contents"):
            raise InvalidInput(
                f"input '{spec.name}' has typed 'contents' but the request carries raw_input_contents; send every "
                "input's data one way: all raw (in input order) or all typed"
            )
        headers.append((spec, shape, count))
    validation.check_complete(signature, seen)
    outputs = _requested_outputs(request.outputs, signature)

    inputs: dict[str, np.ndarray] = {}
    for i, (spec, shape, count) in enumerate(headers):
        if raw:
            inputs[spec.name] = _from_raw(spec, shape, count, raw[i], i, limits)
        else:
            inputs[spec.name] = _from_contents(spec, shape, count, request.inputs[i], limits)
    return InferRequest(inputs, outputs, request_id or None, parameters)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """``response`` as a ``ModelInferResponse``: outputs in order, their data in ``raw_output_contents``."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for name, value in response.outputs.items():
        arr = np.asarray(value)
        datatype = datatype_of(arr.dtype)
        message.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            message.raw_output_contents.append(bytes_to_wire(arr))
        else:
            message.raw_output_contents.append(np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes())
    return message


def model_metadata(
    name: str, versions: Sequence[str], platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=name,
        versions=list(versions),
        platform=platform,
        inputs=[_tensor_metadata(s) for s in inputs],
        outputs=[_tensor_metadata(s) for s in outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


# -- inputs -----------------------------------------------------------------------------------------------------------


def _from_raw(
    spec: TensorSpec, shape: list[int], count: int, raw: bytes, index: int, limits: RequestLimits
) -> np.ndarray:
    datatype = spec.datatype
    if datatype != "BYTES":
        itemsize = DATATYPES[datatype].itemsize
        if len(raw) != count * itemsize:
            raise InvalidInput(
                f"input '{spec.name}' has {len(raw):,} bytes in raw_input_contents[{index}]; shape "
                f"{format_shape(shape)} of {datatype} needs {count:,} x {itemsize} = {count * itemsize:,} bytes"
            )
    return from_binary(spec, shape, memoryview(raw), limits)


def _from_contents(
    spec: TensorSpec, shape: list[int], count: int, tensor: pb.ModelInferRequest.InferInputTensor, limits: RequestLimits
) -> np.ndarray:
    name, datatype = spec.name, spec.datatype
    if datatype not in CONTENTS_FIELD:
        raise InvalidInput(
            f"input '{name}' is {datatype}, which has no typed contents field; send it as raw_input_contents "
            "(little-endian bytes, for every input of the request)"
        )
    field, wire_dtype = CONTENTS_FIELD[datatype]
    contents = tensor.contents
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InvalidInput(
            f"input '{name}' is {datatype} but its contents fill {', '.join(others)}; {datatype} data goes in {field}"
        )
    values = getattr(contents, field)
    if count and not tensor.HasField("contents"):
        raise InvalidInput(
            f"input '{name}' has no data; send its {count:,} elements in contents.{field}, or every input's data in "
            "raw_input_contents"
        )
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}' has {len(values):,} elements in contents.{field}; shape {format_shape(shape)} needs "
            f"{count:,}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        for i, element in enumerate(values):
            limits.check_bytes_element(name, i, len(element))
            arr[i] = element
        return arr.reshape(shape)
    dtype = DATATYPES[datatype]
    parts = [_typed_slice(name, datatype, dtype, wire_dtype, values[i : i + _SLICE]) for i in range(0, count, _SLICE)]
    arr = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return arr.reshape(shape)


def _typed_slice(
    name: str, datatype: str, dtype: np.dtype[Any], wire_dtype: np.dtype[Any], values: list[Any]
) -> np.ndarray:
    wide = np.array(values, dtype=wire_dtype)
    if dtype != wire_dtype and dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        lo, hi = wide.min(), wide.max()
        if lo < info.min or hi > info.max:
            culprit = lo if lo < info.min else hi
            raise InvalidInput(
                f"input '{name}' value {culprit} is out of range for {datatype} [{info.min}, {info.max}]"
            )
    return wide.astype(dtype)


# -- parameters and outputs -------------------------------------------------------------------------------------------


def _parameters(parameters: Any, where: str) -> dict[str, Any]:
    """A parameters map as plain values; a value of a kind this protocol does not define (Triton's double and
    uint64 parameters arrive as unknown fields) is dropped."""
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        if key in UNSUPPORTED_PARAMETERS:
            raise InvalidInput(f"parameter '{key}' of {where} is not supported by this server; remove it")
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def _requested_outputs(
    requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor], signature: Signature
) -> list[str] | None:
    if not requested:  # none named: every output, as in Triton
        return None
    names: list[str] = []
    for output in requested:
        validation.output_spec(signature, output.name, names)
        _parameters(output.parameters, f"output '{output.name}'")
        names.append(output.name)
    return names
