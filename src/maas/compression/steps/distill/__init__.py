"""The ``distill`` recipe step: train a small student on the candidate's (the teacher's) soft predictions.

The teacher is a torch or ONNX classifier (a Hugging Face encoder returns embeddings, not scores); the
child is the student, a torch model. The training is :mod:`~maas.compression.steps.distill.train`.
"""

from __future__ import annotations

from dataclasses import replace

from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import DistillStep
from maas.compression.steps.base import Planned, StepType
from maas.imports import resolve


class Distill:
    def describe(self, step: DistillStep) -> str:
        return step.student.factory

    def validate(self, step: DistillStep, where: str) -> None:
        resolve(step.student.factory, f"{where}.student.factory")
        resolve(step.train.dataset, f"{where}.train.dataset")

    def accepts(self, step: DistillStep, before: Planned) -> str | None:
        if before.kind == "hf":
            return "distillation needs a classifier teacher (torch or ONNX), not a Hugging Face encoder"
        return None

    def produces(self, step: DistillStep, before: Planned) -> Planned:
        return replace(before, kind="torch")

    def apply(self, step: DistillStep, cand: Candidate, ctx: StepContext) -> Candidate:
        """A new ``torch`` candidate: the student trained on ``cand``'s predictions."""
        from maas.compression.steps.distill import train

        return train.apply(step, cand, ctx)


STEP: StepType[DistillStep] = Distill()
