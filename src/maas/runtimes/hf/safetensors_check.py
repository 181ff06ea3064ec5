"""A safetensors file's header checked against the file, without loading it: what registration can tell
about weights a loader would refuse later (a tensor whose declared size does not match its bytes, offsets
outside the file, overlapping tensors). The format: an 8-byte little-endian header length, that many bytes
of JSON naming each tensor's dtype, shape and ``[begin, end)`` byte offsets into the data that follows."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

from maas.errors import InvalidInput

#: Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
#: Headers past this size are refused (the reference loader's own cap is 100 MB).
MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> None:
    """Refuse ``path`` (``InvalidInput``, naming the file and the tensor) unless its header describes tensors
    that lie within its data, each exactly as long as its dtype and shape say, none overlapping."""
    shown = path.name
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(MAX_HEADER, size - 8):
                raise InvalidInput(f"{shown}: its safetensors header claims {length:,} bytes; the file has {size:,}")
            header: Any = json.loads(fh.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"{shown} is not a safetensors file ({type(exc).__name__}); save weights with safetensors"
        ) from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{shown}: its safetensors header is not a JSON object")
    data = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{shown}: tensor {str(name)[:80]!r}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise InvalidInput(f"{where} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 32:
            raise InvalidInput(f"{where} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise InvalidInput(f"{where} has offsets outside the file's {data:,} data bytes")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != expected:
            raise InvalidInput(
                f"{where} declares {dtype} {shape[:8]} ({expected:,} bytes) but holds {offsets[1] - offsets[0]:,} bytes"
            )
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    for (_, end), (begin, _) in itertools.pairwise(spans):
        if begin < end:
            raise InvalidInput(f"{shown}: two tensors overlap in its data; save the weights again with safetensors")
