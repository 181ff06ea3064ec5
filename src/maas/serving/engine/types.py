"""What every API family hands the serving engine and gets back: tensors by name, nothing of the wire.

REST (JSON or binary), gRPC and later API families each decode their own body into an :class:`InferRequest`
(checked against the model's signature by :mod:`maas.serving.validation`) and encode the
:class:`InferResponse` in their own form; the engine in between never sees bytes of a transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferRequest:
    """One inference request, decoded and validated: ``inputs`` match the signature (dtype, shape) exactly.

    ``outputs`` None asks for every output. ``parameters`` are the request's own (OIP ``parameters``), passed
    through untouched; the engine reads none of them today.
    """

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """The size of the batch dimension (dimension 0 of the first input), 1 for a scalar input."""
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass(slots=True)
class InferResponse:
    """The result of one :class:`InferRequest`: the requested outputs in signature order, and which model version
    computed them (a bare name may move to another version while a request runs; this is the one it ran on)."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
