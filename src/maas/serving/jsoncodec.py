"""JSON in and out without holding Python's GIL for long.

``json.loads`` and ``json.dumps`` are single C calls: while one parses a large body, no other thread runs,
not even the event loop answering ``/v2/health/live``. Small bodies take the C path (a few milliseconds);
larger ones go through the standard library's pure-Python scanner, which lets other threads in every few
milliseconds at about a fifth of the speed. Output data is encoded in slices for the same reason.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import orjson

#: Bodies up to this size parse in one C call (about 10 ms on a slow core).
C_PARSE_BYTES = 512 * 1024
#: Elements encoded per C call, and bytes of texts.
ENCODE_SLICE = 32_768
ENCODE_SLICE_BYTES = 1 << 20

_python_decoder = json.JSONDecoder()
_python_decoder.scan_once = json.scanner.py_make_scanner(_python_decoder)  # type: ignore[attr-defined]


def loads(data: bytes) -> Any:
    """Parse UTF-8 JSON (NaN and Infinity accepted, as Triton's clients send them), yielding the GIL on large input.

    Small bodies go to orjson (several times faster than ``json``); what orjson refuses but the standard library
    reads (NaN, integers past 64 bits) or reports better is parsed again by ``json``. Raises ``UnicodeDecodeError``,
    ``json.JSONDecodeError``, ``ValueError`` or ``RecursionError`` as ``json.loads`` does.
    """
    if len(data) <= C_PARSE_BYTES:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return json.loads(data.decode("utf-8"))
    return _python_decoder.decode(data.decode("utf-8"))


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
    if (flat.size <= ENCODE_SLICE and flat.dtype.kind in "iub") or (flat.dtype.kind == "f" and _finite(flat)):
        # One C call, no Python floats: orjson writes numpy numbers directly (NaN would become null: not here).
        try:
            text = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:  # a layout orjson does not take: the general path below
            pass
        else:
            if budget is not None:
                budget.spend(len(text))
            return [text]
    return _pieces((flat[i : i + ENCODE_SLICE].tolist() for i in range(0, flat.size, ENCODE_SLICE)), budget)


def _finite(flat: np.ndarray) -> bool:
    return flat.size <= ENCODE_SLICE and flat.dtype.itemsize in (4, 8) and bool(np.isfinite(flat).all())


def dumps_texts(values: Iterable[bytes], budget: Budget | None = None) -> list[bytes]:
    """A JSON list of UTF-8 texts (invalid sequences replaced), as :func:`dumps_flat` makes it: decoded and encoded a
    slice at a time, a slice holding at most ``ENCODE_SLICE`` texts or ``ENCODE_SLICE_BYTES`` bytes."""
    return _pieces(_text_slices(values), budget)


def _text_slices(values: Iterable[bytes]) -> Iterator[list[str]]:
    part: list[str] = []
    size = 0
    for value in values:
        if part and (len(part) >= ENCODE_SLICE or size + len(value) > ENCODE_SLICE_BYTES):
            yield part
            part, size = [], 0
        part.append(value.decode("utf-8", errors="replace"))
        size += len(value)
    if part:
        yield part


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
