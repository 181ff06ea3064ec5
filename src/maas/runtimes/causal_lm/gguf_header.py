"""A GGUF file's header read with every count checked against the file, before any other reader touches it.

GGUF (llama.cpp's format): ``GGUF`` magic, a version, the tensor and key/value counts, the key/value pairs
(typed scalars, strings and arrays), one info record per tensor (name, dimensions, ggml type, offset), then the
aligned tensor data. :func:`read_header` walks all of it in bounded steps: a count or length the file cannot hold
is refused at once, so a crafted header never makes a reader loop over billions of entries (``gguf``'s own reader
does, on an array of zero-size elements past the file's end) or allocate beyond the file. It keeps scalars and
strings, only the length of arrays, and checks that every tensor's data lies within the file, none overlapping.

Arrays are bounded too, whatever the file's size: ``gguf``'s reader (which transformers converts with) builds a
numpy view per element, about a kilobyte each, so only the tokenizer's arrays (one entry per token or merge) may
hold up to :data:`MAX_VOCAB` elements; any other at most :data:`MAX_ARRAY`, and all of those together
:data:`MAX_OTHER_ELEMENTS`.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from maas.errors import InvalidInput

MAGIC = b"GGUF"
VERSIONS = (2, 3)
#: Sanity bounds far above any real model (a 400B model has a few thousand tensors and under 100 keys).
MAX_TENSORS = 1_000_000
MAX_KEYS = 100_000
MAX_KEY_BYTES = 65_535
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 3
DEFAULT_ALIGNMENT = 32
#: The arrays that may be long: the tokenizer's, one element per token (merges: per merge).
TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)
#: Elements of each tokenizer array (the largest real vocabularies have about 262k tokens).
MAX_VOCAB = 1 << 20
#: Elements of any other array (nested ones counted), and of all of them together.
MAX_ARRAY = 4096
MAX_OTHER_ELEMENTS = 65_536

#: GGUF value type -> struct code of the scalar types.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

Scalar = int | float | bool | str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    #: ggml type number (``gguf.GGMLQuantizationType``).
    ggml_type: int
    #: As GGUF stores them: the fastest-varying dimension first.
    dims: tuple[int, ...]
    #: Absolute position of the data in the file, and its length.
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    #: Scalar and string values by key.
    metadata: dict[str, Scalar] = field(default_factory=dict)
    #: Array keys -> number of elements.
    arrays: dict[str, int] = field(default_factory=dict)
    tensors: tuple[TensorInfo, ...] = ()

    def get(self, key: str, default: Scalar | None = None) -> Scalar | None:
        return self.metadata.get(key, default)


class _Reader:
    def __init__(self, fh: BinaryIO, size: int, shown: str) -> None:
        self.fh, self.size, self.shown = fh, size, shown

    @property
    def pos(self) -> int:
        return self.fh.tell()

    def fail(self, what: str) -> InvalidInput:
        return InvalidInput(
            f"{self.shown} is a damaged or truncated GGUF file: {what}; download or convert it again "
            "(llama.cpp's convert_hf_to_gguf.py writes valid files)"
        )

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,}; the file has {self.size:,}")
        return self.fh.read(n)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,}; the file has {self.size:,}")
        self.fh.seek(n, 1)

    def unpack(self, code: str, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]
        return value

    def uint(self, code: str, what: str) -> int:
        return int(self.unpack(code, what))

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.uint("Q", f"the length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} claims {length:,} bytes (at most {limit:,})")
        try:
            return self.take(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_string(self, what: str) -> None:
        self.skip(self.uint("Q", f"the length of {what}"), what)

    def value(self, kind: int, what: str) -> Scalar | None:
        """A scalar or string value; arrays are skipped (None), with their element count checked."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            self.skip_array(what, 1, MAX_ARRAY)
            return None
        raise self.fail(f"{what} has unknown value type {kind}")

    def skip_array(self, what: str, depth: int, limit: int) -> tuple[int, int]:
        """Skip an array: its element count, and its elements with those of nested arrays (at most ``limit``)."""
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        kind = self.uint("I", f"the element type of {what}")
        count = self.uint("Q", f"the length of {what}")
        # Every element takes at least one byte (a string: its 8-byte length; an array: 12), so the rest of the
        # file bounds the count before any loop runs.
        least = struct.calcsize(_SCALARS[kind]) if kind in _SCALARS else {_STRING: 8, _ARRAY: 12}.get(kind)
        if least is None:
            raise self.fail(f"{what} has unknown element type {kind}")
        if count * least > self.size - self.pos:
            raise self.fail(f"{what} claims {count:,} elements, more than the rest of the file holds")
        if count > limit:
            raise InvalidInput(
                f"{self.shown}: metadata array {what} holds {count:,} elements or more, where maas accepts at most "
                f"{limit:,} (only the tokenizer's arrays may be long); the file is not a model maas can use"
            )
        total = count
        if kind in _SCALARS:
            self.skip(count * least, what)
        elif kind == _STRING:
            for _ in range(count):
                self.skip_string(what)
        else:
            for _ in range(count):
                total += self.skip_array(what, depth + 1, limit - total)[1]
        return count, total


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at ``path``; ``InvalidInput`` naming what is wrong if it is not one, or if
    any count, length, type or tensor extent does not fit the file."""
    shown = path.name
    size = path.stat().st_size
    with path.open("rb") as fh:
        r = _Reader(fh, size, shown)
        magic = fh.read(4)
        if magic != MAGIC:
            raise InvalidInput(
                f"{shown} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); give a .gguf model file "
                "as llama.cpp writes it"
            )
        version = r.uint("I", "the version")
        if version & 0xFFFF == 0 and version:
            raise InvalidInput(f"{shown} is a big-endian GGUF file; maas reads little-endian GGUF files only")
        if version not in VERSIONS:
            raise InvalidInput(
                f"{shown} is GGUF version {version}; maas reads versions {', '.join(map(str, VERSIONS))} "
                "(convert it again with a current llama.cpp)"
            )
        n_tensors = r.uint("Q", "the tensor count")
        n_keys = r.uint("Q", "the metadata count")
        # A key/value pair takes at least 13 bytes, a tensor record 24: refuse counts the file cannot hold.
        if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS or n_keys * 13 + n_tensors * 24 > size - r.pos:
            raise r.fail(f"its header claims {n_tensors:,} tensors and {n_keys:,} metadata keys")
        metadata: dict[str, Scalar] = {}
        arrays: dict[str, int] = {}
        others = 0  # elements of the arrays that are not the tokenizer's
        for _ in range(n_keys):
            key = r.string("a metadata key", MAX_KEY_BYTES)
            if key in metadata or key in arrays:
                raise r.fail(f"metadata key {key[:80]!r} appears twice")
            kind = r.uint("I", f"the type of {key[:80]!r}")
            if kind == _ARRAY:
                tokenizer = key in TOKENIZER_ARRAYS
                limit = MAX_VOCAB if tokenizer else min(MAX_ARRAY, MAX_OTHER_ELEMENTS - others)
                arrays[key], total = r.skip_array(repr(key[:80]), 1, limit)
                others += 0 if tokenizer else total
                continue
            if key == "general.alignment" and kind != 4:
                raise r.fail("general.alignment is not a uint32")  # as gguf's reader requires
            value = r.value(kind, repr(key[:80]))
            assert value is not None
            metadata[key] = value
        infos = [_tensor_info(r) for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment is {alignment!r}, not a power of two")
        start = -(-r.pos // alignment) * alignment
    return GGUFHeader(version, metadata, arrays, _place(r, infos, start, alignment))


def _tensor_info(r: _Reader) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string("a tensor name", MAX_KEY_BYTES)
    n_dims = r.uint("I", f"the rank of tensor {name[:80]!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(f"tensor {name[:80]!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(r.uint("Q", f"the shape of tensor {name[:80]!r}") for _ in range(n_dims))
    return name, dims, r.uint("I", f"the type of tensor {name[:80]!r}"), r.uint("Q", f"the offset of {name[:80]!r}")


def _place(
    r: _Reader, infos: list[tuple[str, tuple[int, ...], int, int]], start: int, alignment: int
) -> tuple[TensorInfo, ...]:
    """Each tensor's extent in the file, checked: a known type, whole blocks, within the file, no overlaps."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, raw_type, offset in infos:
        where = f"tensor {name[:80]!r}"
        if name in seen:
            raise r.fail(f"{where} appears twice")
        seen.add(name)
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise r.fail(f"{where} has unknown ggml type {raw_type}") from None
        count = math.prod(dims)
        if dims[0] % block:
            raise r.fail(f"{where} has {dims[0]} elements per row, not whole blocks of {block}")
        nbytes = count // block * block_bytes
        if offset % alignment or start + offset + nbytes > r.size:
            raise r.fail(f"{where} claims data at {offset:,} (+{nbytes:,} bytes) beyond the file's end")
        tensors.append(TensorInfo(name, raw_type, dims, start + offset, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes) for t in tensors if t.nbytes)
    for (_, end), (begin, _) in itertools.pairwise(spans):
        if begin < end:
            raise r.fail("two tensors' data overlap")
    return tuple(tensors)
