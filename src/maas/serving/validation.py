"""Inputs against a model's signature, transport-neutral: every API family (REST, gRPC, …) checks a request's
tensors here, so each gets the same rules and the same messages.

A tensor is checked from what its header declares (name, datatype, shape) before any of its data is read:
the name must be one of the model's inputs, given once; the datatype the model's; the shape one the
signature accepts and within the request limits (:mod:`maas.serving.limits`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from maas.errors import InvalidInput
from maas.serving.limits import RequestLimits
from maas.tensors import DATATYPES, Signature, TensorSpec, format_shape


def brief(value: Any) -> str:
    """A client's value quoted in an error, bounded: never the whole of a 4-million-element list."""
    if isinstance(value, list) and len(value) > 8:
        return f"a list of {len(value):,} items"
    if isinstance(value, str | dict) and len(value) > 64:
        return f"a {type(value).__name__} of {len(value):,} {'characters' if isinstance(value, str) else 'keys'}"
    text = json.dumps(value) if isinstance(value, list | int | float | bool | None | str) else type(value).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.describe() for s in specs) or "(none)"


def input_spec(signature: Signature, name: str, seen: Collection[str]) -> TensorSpec:
    """The spec of input ``name``; refused when the model has no such input or the request names it twice."""
    spec = signature.input(name)
    if spec is None:
        raise InvalidInput(f"model has no input '{name}'; its inputs are {describe(signature.inputs)}")
    if name in seen:
        raise InvalidInput(f"input '{name}' appears more than once in the request")
    return spec


def check_complete(signature: Signature, seen: Collection[str]) -> None:
    missing = [s for s in signature.inputs if s.name not in seen]
    if missing:
        raise InvalidInput(
            f"request is missing input(s) {describe(missing)}; the model needs all of {describe(signature.inputs)}"
        )


def check_input(spec: TensorSpec, datatype: Any, shape: Any, limits: RequestLimits) -> tuple[str, list[int], int]:
    """``(datatype, shape, element count)`` of an input whose header declares ``datatype`` and ``shape``, after
    checking them against ``spec`` and ``limits``."""
    name = spec.name
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
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(
            f"input '{name}' shape must be a list of non-negative integers, got {brief(shape)}; "
            f"model expects {format_shape(spec.shape)}"
        )
    count = limits.check_shape(name, shape, datatype)
    if not spec.accepts(shape):
        raise InvalidInput(
            f"input '{name}' has shape {format_shape(shape)}; model expects {format_shape(spec.shape)}"
            + (" (-1 is any size)" if -1 in spec.shape else "")
        )
    return datatype, shape, count


def output_spec(signature: Signature, name: str, seen: Collection[str]) -> TensorSpec:
    spec = signature.output(name)
    if spec is None:
        raise InvalidInput(f"model has no output '{name}'; its outputs are {describe(signature.outputs)}")
    if name in seen:
        raise InvalidInput(f"output '{name}' is requested more than once")
    return spec
