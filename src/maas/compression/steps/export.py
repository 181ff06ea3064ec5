"""The ``export`` step: the candidate into the format it will be registered as (``onnx`` or ``torch_export``).

A Hugging Face directory stays one (exported, it holds ``model.onnx``). An int8 ONNX model cannot become a
torch program, and a torchao dynamic int8 program cannot become ONNX (the exporter has no ``aten._int_mm``).
"""

from __future__ import annotations

from dataclasses import replace

from maas.compression.candidate import Candidate, StepContext, to_onnx, to_torch
from maas.compression.recipe import ExportStep
from maas.compression.steps.base import Planned, StepType


class Export:
    def describe(self, step: ExportStep) -> str:
        return step.format

    def validate(self, step: ExportStep, where: str) -> None:
        pass  # an export names nothing to import

    def accepts(self, step: ExportStep, before: Planned) -> str | None:
        if step.format == "torch_export" and before.kind == "hf":
            return "a Hugging Face model stays a Hugging Face directory; export it to onnx instead"
        if step.format == "torch_export" and before.int8_onnx:
            return "an int8 ONNX model cannot become a torch program; export to onnx, or quantize with torchao"
        if step.format == "onnx" and before.int8_torch_dynamic:
            return (
                "torchao dynamic int8 cannot be exported to ONNX (the exporter has no aten._int_mm); "
                "use torchao mode weight_only, or quantize with backend onnxruntime after exporting"
            )
        return None

    def produces(self, step: ExportStep, before: Planned) -> Planned:
        if step.format == "torch_export":
            return replace(before, kind="torch")
        return before if before.kind == "hf" else replace(before, kind="onnx")

    def apply(self, step: ExportStep, cand: Candidate, ctx: StepContext) -> Candidate:
        if step.format == "onnx":
            out = to_onnx(cand, ctx)
            if out.kind != "hf":
                out.format = "onnx"
            out.history.append("export onnx")
            return out
        out = to_torch(cand, ctx, why="export torch_export")
        out.format = "torch_export"
        out.history.append("export torch_export")
        return out


STEP: StepType[ExportStep] = Export()
