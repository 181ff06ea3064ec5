"""What a quantization backend provides, and the table of backends by name.

Each backend is one module implementing :class:`Backend`, imported on first use:
:mod:`~maas.compression.steps.quantize.ort` (ONNX Runtime) and :mod:`~maas.compression.steps.quantize.torchao`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import QuantizeStep
from maas.errors import InvalidInput

#: backend name -> module implementing :class:`Backend`, imported on first use.
BACKENDS: dict[str, str] = {
    "onnxruntime": "maas.compression.steps.quantize.ort",
    "torchao": "maas.compression.steps.quantize.torchao",
}

#: Runs one batch and returns the outputs as arrays.
Runner = Callable[[], Sequence[np.ndarray]]


class Backend(Protocol):
    def modes(self, step: QuantizeStep) -> list[str]:
        """The modes ``mode: auto`` tries."""
        ...

    def prepare(self, cand: Candidate, ctx: StepContext) -> Candidate:
        """The fp32 candidate in the form this backend quantizes (an ONNX file, a torch module with Linear layers)."""
        ...

    def quantize(self, step: QuantizeStep, mode: str, cand: Candidate, ctx: StepContext) -> Candidate:
        """A new candidate: ``cand`` (from :meth:`prepare`) quantized in ``mode``."""
        ...

    def runner(self, cand: Candidate, ctx: StepContext, rows: int) -> Runner:
        """A callable running ``cand`` on ``rows`` rows built from the example inputs."""
        ...

    def describe(self, step: QuantizeStep, mode: str) -> str:
        """The history line, e.g. ``quantize onnxruntime dynamic int8 (per-channel)``."""
        ...


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InvalidInput(f"unknown quantization backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module: Backend = importlib.import_module(BACKENDS[name])
    return module
