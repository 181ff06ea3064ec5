"""JSON in and out without holding Python's GIL for long.

``json.loads`` and ``json.dumps`` are single C calls: while one parses a large body, no other thread runs,
not even the event loop answering ``/v2/health/live``. Small bodies take the C path (a few milliseconds);
larger ones go through the standard library's pure-Python scanner, which lets other threads in every few
milliseconds at about a fifth of the speed. Output data is encoded in slices for the same reason.
"""

from __future__ import annotations

import json
import json.scanner
from typing import Any

import numpy as np

#: Bodies up to this size parse in one C call (about 10 ms on a slow core).
C_PARSE_BYTES = 512 * 1024
#: Elements encoded per C call.
ENCODE_SLICE = 32_768

_python_decoder = json.JSONDecoder()
_python_decoder.scan_once = json.scanner.py_make_scanner(_python_decoder)  # type: ignore[attr-defined]


def loads(text: str) -> Any:
    """``json.loads`` (NaN and Infinity accepted, as Triton's clients send them), yielding the GIL on large input."""
    if len(text) <= C_PARSE_BYTES:
        return json.loads(text)
    return _python_decoder.decode(text)


def dumps_flat(array: np.ndarray) -> str:
    """A JSON list of ``array``'s elements in row-major order, encoded in slices (see the module docstring)."""
    flat = array.reshape(-1)
    parts = [
        json.dumps(flat[i : i + ENCODE_SLICE].tolist(), separators=(",", ":"))[1:-1]
        for i in range(0, flat.size, ENCODE_SLICE)
    ]
    return "[" + ",".join(parts) + "]"


def dumps_texts(values: list[str]) -> str:
    """A JSON list of strings, encoded in slices."""
    parts = [
        json.dumps(values[i : i + ENCODE_SLICE], separators=(",", ":"))[1:-1]
        for i in range(0, len(values), ENCODE_SLICE)
    ]
    return "[" + ",".join(parts) + "]"
