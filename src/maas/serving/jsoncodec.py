"""JSON in and out without holding Python's GIL for long.

``json.loads`` and ``json.dumps`` are single C calls: while one parses a large body, no other thread runs,
not even the event loop answering ``/v2/health/live``. Small bodies take the C path (a few milliseconds);
larger ones go through the standard library's pure-Python scanner, which lets other threads in every few
milliseconds at about a fifth of the speed. Output data is encoded in slices for the same reason.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Iterator
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


class OverBudget(Exception):
    """Encoding went past its :class:`Budget`."""


class Budget:
    """Bytes a response may still take (None: unbounded)."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def spend(self, size: int) -> None:
        if self.left is not None:
            self.left -= size
            if self.left < 0:
                raise OverBudget


def dumps_flat(array: np.ndarray, budget: Budget | None = None) -> list[bytes]:
    """A JSON list of ``array``'s elements in row-major order, as pieces of ASCII to join, encoded in slices
    (see the module docstring) and charged to ``budget`` as they are made."""
    flat = array.reshape(-1)
    return _pieces((flat[i : i + ENCODE_SLICE].tolist() for i in range(0, flat.size, ENCODE_SLICE)), budget)


def dumps_texts(values: list[str], budget: Budget | None = None) -> list[bytes]:
    """A JSON list of strings, as :func:`dumps_flat` makes it."""
    return _pieces((values[i : i + ENCODE_SLICE] for i in range(0, len(values), ENCODE_SLICE)), budget)


def _pieces(slices: Iterator[list[Any]], budget: Budget | None) -> list[bytes]:
    budget = budget or Budget(None)
    out = [b"["]
    for part in slices:
        text = json.dumps(part, separators=(",", ":"))[1:-1].encode()
        if not text:
            continue
        budget.spend(len(text) + 1)
        if len(out) > 1:
            out.append(b",")
        out.append(text)
    out.append(b"]")
    return out
