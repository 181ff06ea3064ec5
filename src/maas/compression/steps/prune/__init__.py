"""The ``prune`` recipe step: structured (whole neurons, channels or attention heads) or unstructured.

Structured pruning ranks the units of each prunable layer (:mod:`~maas.compression.steps.prune.graph`) by
the L2 norm of their weights, keeps the strongest ``1 - amount``, and rebuilds every tensor that touches
them at its smaller shape, so the saved model is smaller and faster; unstructured pruning zeroes the
smallest weights (:mod:`~maas.compression.steps.prune.units`). Heads of Hugging Face encoders are removed
by :mod:`~maas.compression.steps.prune.heads`. Neurons and channels are pruned on a torch graph (an ONNX
model is imported first), heads on the Hugging Face model; an int8 model is never pruned.
"""

from __future__ import annotations

from dataclasses import replace

from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import PruneStep
from maas.compression.steps.base import Planned, StepType
from maas.imports import resolve


def _heads(step: PruneStep) -> bool:
    return step.method == "structured" and step.target == "heads"


class Prune:
    def describe(self, step: PruneStep) -> str:
        return f"{step.method} {step.amount:g}"

    def validate(self, step: PruneStep, where: str) -> None:
        if step.finetune is not None:
            resolve(step.finetune.dataset, f"{where}.finetune.dataset")

    def accepts(self, step: PruneStep, before: Planned) -> str | None:
        if _heads(step):
            if before.kind != "hf":
                return "pruning attention heads needs a Hugging Face transformer (format hf_transformers)"
            return None
        if before.kind == "hf":
            return "a Hugging Face transformer is pruned by heads: use method structured, target heads"
        if before.int8_onnx:
            return "cannot prune a model after int8 quantization; prune first, then quantize"
        return None

    def produces(self, step: PruneStep, before: Planned) -> Planned:
        return before if _heads(step) else replace(before, kind="torch")

    def apply(self, step: PruneStep, cand: Candidate, ctx: StepContext) -> Candidate:
        """A new candidate: ``cand`` pruned (and fine-tuned when ``step.finetune`` is set)."""
        if _heads(step):
            from maas.compression.steps.prune import heads

            return heads.apply(step, cand, ctx)
        from maas.compression.steps.prune import units

        return units.apply(step, cand, ctx)


STEP: StepType[PruneStep] = Prune()
