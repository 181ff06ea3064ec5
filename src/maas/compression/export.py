"""The ``export`` step: the candidate into the format it will be registered as (``onnx`` or ``torch_export``)."""

from __future__ import annotations

from maas.compression.candidate import Candidate, StepContext, to_onnx, to_torch
from maas.compression.recipe import ExportStep


def apply(step: ExportStep, cand: Candidate, ctx: StepContext) -> Candidate:
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
