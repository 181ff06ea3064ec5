"""Tensor data of the Open Inference Protocol REST body: JSON ``data`` lists and the binary extension's raw
bytes to numpy arrays, and arrays back to the wire.

Every conversion of a large tensor runs a slice at a time, so no single C call holds the GIL for long
(see :mod:`maas.serving.jsoncodec`).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from maas.errors import InvalidInput
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, TensorSpec, format_shape

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

#: Elements converted per C call.
_SLICE = 65_536


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


def from_json(spec: TensorSpec, shape: list[int], data: list[Any], limits: RequestLimits) -> np.ndarray:
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
        if bad == {float} and datatype[0] in "IU":
            _check_huge_integers(name, datatype, flat)
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


def _check_huge_integers(name: str, datatype: str, flat: list[Any]) -> None:
    """orjson reads an integer past 64 bits as a float: name it as the out-of-range integer the client sent."""
    info = np.iinfo(DATATYPES[datatype])
    for x in flat:
        if type(x) is float and x.is_integer() and not info.min <= x <= info.max:
            raise InvalidInput(f"input '{name}' value {int(x)} is out of range for {datatype} [{info.min}, {info.max}]")


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
        if dtype == wide.dtype:
            return wide
        top = float(np.finfo(dtype).max)
        if wide.size and (wide.max() > top or wide.min() < -top):  # NaN compares False: it passes through
            with np.errstate(over="ignore"):
                arr = wide.astype(dtype)
            if np.any(np.isinf(arr) & np.isfinite(wide)):
                raise InvalidInput(f"input '{name}' holds values out of range for {datatype} (max {top})")
            return arr
        return wide.astype(dtype)
    return np.array(flat, dtype=dtype)


def from_binary(spec: TensorSpec, shape: list[int], raw: memoryview, limits: RequestLimits) -> np.ndarray:
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


def bytes_to_wire(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for x in arr.ravel():
        b = as_bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    # Mirrors tritonclient.utils.serialize_byte_tensor: anything else travels as its UTF-8 text.
    return str(x).encode("utf-8")


def json_type(value: Any) -> str:
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
