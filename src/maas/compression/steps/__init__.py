"""The recipe step types, one module (or sub-package) each, found by name and imported on first use.

A step type is a :class:`~maas.compression.steps.base.StepType`: what it accepts and produces (the
candidate's kind, and what quantization has made impossible), what it must resolve before work, and the
work. Declarations import neither torch nor onnx; each step imports its machinery when it runs.
"""

from __future__ import annotations

from typing import Any

from maas.compression.steps.base import StepType
from maas.errors import InvalidInput
from maas.imports import load_entry

#: step type -> "module:attribute" of its :class:`StepType`.
STEPS: dict[str, str] = {
    "prune": "maas.compression.steps.prune:STEP",
    "quantize": "maas.compression.steps.quantize:STEP",
    "distill": "maas.compression.steps.distill:STEP",
    "export": "maas.compression.steps.export:STEP",
}

_loaded: dict[str, StepType[Any]] = {}


def step_type(name: str) -> StepType[Any]:
    """The :class:`StepType` registered under ``name``."""
    if name not in STEPS:
        raise InvalidInput(f"unknown step type {name!r}; valid step types: {', '.join(STEPS)}")
    if name not in _loaded:
        _loaded[name] = load_entry(STEPS[name])
    return _loaded[name]
