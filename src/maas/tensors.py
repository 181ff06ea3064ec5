"""Open Inference Protocol tensors: datatypes <-> numpy, and the signature of a model.

A signature lists a model's inputs and outputs as :class:`TensorSpec` (name, OIP datatype, shape with
-1 for a dynamic dimension). Runtimes infer it from the artifact; the registry stores it; the server
checks requests against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: OIP datatype -> numpy dtype. BYTES tensors are numpy object arrays holding ``bytes``.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_BY_NUMPY: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype; ValueError naming the valid ones otherwise."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}") from None


def datatype_of(dtype: npt.DTypeLike) -> str:
    """The OIP datatype of a numpy dtype (``str``/``bytes`` arrays map to BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _BY_NUMPY[dt]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no Open Inference Protocol datatype") from None


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a signature. ``-1`` in ``shape`` is a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        numpy_dtype(self.datatype)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a concrete ``shape`` fits this spec."""
        return len(shape) == len(self.shape) and all(s == -1 or s == d for s, d in zip(self.shape, shape, strict=True))

    def describe(self) -> str:
        return f"{self.name} {self.datatype}{format_shape(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), datatype=str(d["datatype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in the order the model takes and returns them."""

    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(x) for x in d.get("inputs", ())),
            outputs=tuple(TensorSpec.from_dict(x) for x in d.get("outputs", ())),
        )


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)
