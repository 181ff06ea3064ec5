"""The ``quantize`` recipe step: int8 with ONNX Runtime (ONNX and Hugging Face ONNX models) or torchao (torch).

Each backend is one module behind :class:`~maas.compression.steps.quantize.backend.Backend`, found by name
and imported on first use: :mod:`~maas.compression.steps.quantize.ort` (with its feeds in ``ort_feeds``,
its graph preparation in ``ort_graph`` and ``attention_fusion``) and
:mod:`~maas.compression.steps.quantize.torchao`. :mod:`~maas.compression.steps.quantize.run` runs the step
the same way for both: quantize, time, keep the fastest.

onnxruntime leaves an int8 ONNX model (a Hugging Face directory stays one, holding the int8 ``model.onnx``),
which cannot be pruned or become a torch program afterwards. torchao quantizes torch models and leaves a
torch model; its dynamic mode cannot be exported to ONNX.
"""

from __future__ import annotations

from dataclasses import replace

from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import QuantizeStep
from maas.compression.steps.base import Planned, StepType
from maas.imports import resolve


class Quantize:
    def describe(self, step: QuantizeStep) -> str:
        return f"{step.backend} {step.mode}"

    def validate(self, step: QuantizeStep, where: str) -> None:
        if step.calibration is not None:
            resolve(step.calibration.dataset, f"{where}.calibration.dataset")

    def accepts(self, step: QuantizeStep, before: Planned) -> str | None:
        if step.backend == "torchao" and before.kind != "torch":
            return (
                f"torchao quantizes torch models, but the model is {before.kind} here; "
                "use backend onnxruntime, or put the torchao step before any ONNX export"
            )
        return None

    def produces(self, step: QuantizeStep, before: Planned) -> Planned:
        if step.backend == "torchao":
            dynamic = before.int8_torch_dynamic or step.mode in ("dynamic", "auto")
            return replace(before, int8_torch_dynamic=dynamic)
        return replace(before, kind="hf" if before.kind == "hf" else "onnx", int8_onnx=True)

    def apply(self, step: QuantizeStep, cand: Candidate, ctx: StepContext) -> Candidate:
        """A new candidate: ``cand`` quantized to int8 by ``step.backend``."""
        from maas.compression.steps.quantize import run

        return run.apply(step, cand, ctx)


STEP: StepType[QuantizeStep] = Quantize()
