"""What a recipe step type provides, and what the plan knows of the candidate between two steps.

The pipeline checks a whole recipe before any work: each step's :meth:`StepType.validate` resolves what
the step names, and :meth:`StepType.accepts` / :meth:`StepType.produces` walk the candidate's
:class:`Planned` state from the source model to the end, so a step that cannot take what the step before
it leaves is named before anything runs. Only then does :meth:`StepType.apply` do the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from maas.compression.candidate import Candidate, Kind, StepContext

S_contra = TypeVar("S_contra", contravariant=True)


@dataclass(frozen=True)
class Planned:
    """What the plan knows of the candidate between two steps."""

    kind: Kind
    #: Quantized to int8 by onnxruntime: it cannot be pruned any more, nor become a torch program.
    int8_onnx: bool = False
    #: Quantized by torchao with dynamic int8 activations (``aten._int_mm``): it cannot become ONNX.
    int8_torch_dynamic: bool = False


class StepType(Protocol[S_contra]):
    """One recipe step type (``prune``, ``quantize``, …), taking its recipe model (``PruneStep``, …)."""

    def describe(self, step: S_contra) -> str:
        """The step's settings in a few words, for progress and errors: ``structured 0.5``."""
        ...

    def validate(self, step: S_contra, where: str) -> None:
        """Import everything the step names (datasets, factories); ``InvalidInput`` naming ``where`` otherwise."""
        ...

    def accepts(self, step: S_contra, before: Planned) -> str | None:
        """Why the step cannot take a candidate in the state ``before``; None when it can."""
        ...

    def produces(self, step: S_contra, before: Planned) -> Planned:
        """The candidate's state after the step, given the state ``before`` (which it accepts)."""
        ...

    def apply(self, step: S_contra, cand: Candidate, ctx: StepContext) -> Candidate:
        """A new candidate: the work of the step. ``cand`` and its files are never changed."""
        ...
