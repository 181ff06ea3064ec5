"""What a recipe may ask of a causal language model, checked before any work: one ``quantize`` step
(``backend: torchao``, ``mode: weight_only`` or ``bfloat16``), and an optional ``evaluation`` naming its own
perplexity texts (``dataset``, ``kwargs``, ``limit``) and the answer length (``new_tokens``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maas.compression.llm.texts import PARAGRAPHS, PROMPTS
from maas.compression.recipe import QuantizeStep, Recipe
from maas.errors import InvalidInput
from maas.imports import resolve

SUPPORTED = "one step `{type: quantize, backend: torchao, mode: weight_only}` (int8 weights) or `mode: bfloat16`"
#: evaluation keys a causal_lm recipe may set; the others measure classifiers and encoders.
EVALUATION_KEYS = ("dataset", "kwargs", "limit", "new_tokens")
DEFAULT_NEW_TOKENS = 48
#: Timed rounds of decoding (each: 1 sequence, then 8, for parent and child in turn).
ROUNDS = 3


@dataclass(frozen=True)
class LLMPlan:
    mode: Literal["weight_only", "bfloat16"]
    texts: list[str]
    prompts: list[str]
    new_tokens: int
    rounds: int = ROUNDS


def llm_plan(recipe: Recipe) -> LLMPlan:
    """The work ``recipe`` asks for a causal_lm model; ``InvalidInput`` naming what is supported otherwise."""
    steps = recipe.steps
    step = steps[0]
    if len(steps) != 1 or not isinstance(step, QuantizeStep):
        kinds = ", ".join(s.type for s in steps)
        raise InvalidInput(f"the recipe has steps [{kinds}]; a causal_lm model takes {SUPPORTED}")
    if step.backend != "torchao" or step.mode not in ("weight_only", "bfloat16"):
        raise InvalidInput(
            f"steps[0] (quantize {step.backend} {step.mode}) cannot quantize a causal_lm model; it takes {SUPPORTED}"
        )
    extra = [
        key
        for key in ("per_channel", "calibration", "op_types")
        if key in step.model_fields_set and getattr(step, key) != QuantizeStep.model_fields[key].default
    ]
    if extra:
        raise InvalidInput(
            f"steps[0] sets {', '.join(extra)}, which a causal_lm model does not take (int8 weights are always "
            "per output channel, with no calibration); remove them"
        )
    texts, prompts, new_tokens = list(PARAGRAPHS), list(PROMPTS), DEFAULT_NEW_TOKENS
    spec = recipe.evaluation
    if spec is not None:
        unused = sorted(set(spec.model_fields_set) - set(EVALUATION_KEYS))
        if unused:
            raise InvalidInput(
                f"evaluation sets {', '.join(unused)}, which a causal_lm model does not take; it takes "
                f"{', '.join(EVALUATION_KEYS)} (dataset: a function returning the texts perplexity is measured on)"
            )
        texts = _texts(spec.dataset, spec.kwargs)
        if spec.limit is not None:
            texts, prompts = texts[: spec.limit], prompts[: spec.limit]
        new_tokens = spec.new_tokens or DEFAULT_NEW_TOKENS
    mode: Literal["weight_only", "bfloat16"] = "weight_only" if step.mode == "weight_only" else "bfloat16"
    return LLMPlan(mode=mode, texts=texts, prompts=prompts, new_tokens=new_tokens)


def _texts(dataset: str, kwargs: dict[str, object]) -> list[str]:
    data = resolve(dataset, "evaluation.dataset")(**kwargs)
    if not isinstance(data, list | tuple) or not data or not all(isinstance(t, str) and t.strip() for t in data):
        raise InvalidInput(
            f"evaluation.dataset {dataset!r} returned {type(data).__name__}; for a causal_lm model it returns a "
            "non-empty list of texts (perplexity is measured on them)"
        )
    return list(data)
