"""Compression recipes: YAML in, one pydantic model per step type, every mistake reported before any work.

A recipe is an optional ``evaluation`` (how parent and child are measured) and a list of ``steps``
applied in order. Each step type is one module: ``prune`` (:mod:`maas.compression.steps.prune`), ``quantize``
(:mod:`maas.compression.steps.quantize`), ``distill`` (:mod:`maas.compression.steps.distill`) and ``export``.

.. code-block:: yaml

    evaluation: {dataset: maas.demo.digits:test_dataset, metric: accuracy, output: probabilities}
    steps:
      - type: prune
        method: structured
        amount: 0.5
        finetune: {dataset: maas.demo.digits:train_dataset, steps: 300}
      - type: export
        format: onnx
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import ErrorDetails

from maas import configfile
from maas.imports import check_import_path

STEP_TYPES = ("prune", "quantize", "distill", "export")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    """A dataset factory (``package.module:function``) called with ``kwargs``. It returns a map-style
    dataset of ``(input, label)`` pairs (tensors or arrays), or of inputs alone, or a list of texts."""

    dataset: str
    kwargs: dict[str, Any] = {}

    _check = field_validator("dataset")(check_import_path)


class TrainSpec(DatasetSpec):
    """Training for fine-tuning after pruning, and for distillation: single process, on the CPU or GPU."""

    steps: int = Field(300, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


class EvaluationSpec(DatasetSpec):
    """How parent and child are compared: the task metric on ``dataset``, latency and throughput."""

    #: ``accuracy`` needs labels; ``cosine`` is the mean cosine similarity of the child's outputs to the
    #: parent's; ``auto`` picks accuracy when the dataset has labels, else cosine.
    metric: Literal["auto", "accuracy", "cosine"] = "auto"
    #: The output the metric reads; default: the first floating-point output.
    output: str | None = None
    batch_size: int = Field(64, ge=1)
    #: Cap on evaluated examples (None: all).
    limit: int | None = Field(None, ge=1)
    #: Timed calls for latency p50 at batch 1 (throughput at batch 32 uses a fifth as many).
    latency_runs: int = Field(50, ge=5, le=100_000)
    #: causal_lm models only: new tokens each prompt is answered with, greedily (default 48).
    new_tokens: int | None = Field(None, ge=2, le=1024)


class PruneStep(_Strict):
    type: Literal["prune"]
    #: ``structured`` removes whole neurons / output channels / attention heads and rebuilds the layers at
    #: their smaller shapes; ``unstructured`` zeroes single weights by magnitude (the file and the speed do
    #: not change; sparsity is made permanent).
    method: Literal["structured", "unstructured"] = "structured"
    #: Fraction removed, 0 < amount < 1.
    amount: float = Field(gt=0, lt=1)
    #: structured: what is removed.
    target: Literal["neurons", "channels", "heads"] = "neurons"
    #: unstructured: one threshold over all layers (global) or the same fraction in each layer.
    scope: Literal["global", "layer"] = "global"
    #: Limit pruning to these layers (names as in the model); default: every layer that can be pruned.
    layers: list[str] | None = None
    finetune: TrainSpec | None = None


class QuantizeStep(_Strict):
    type: Literal["quantize"]
    #: ``onnxruntime`` for ONNX models (and Hugging Face models exported to ONNX); ``torchao`` for torch models.
    backend: Literal["onnxruntime", "torchao"] = "onnxruntime"
    #: onnxruntime: ``dynamic`` (int8 weights, activations quantized at run time) or ``static`` (QDQ,
    #: calibrated). torchao: ``weight_only`` or ``dynamic`` (int8 dynamic activation, int8 weight); causal_lm
    #: models: ``weight_only`` or ``bfloat16`` (weights cast). ``auto`` tries each mode, keeps the fastest at batch 32.
    mode: Literal["auto", "dynamic", "static", "weight_only", "bfloat16"] = "dynamic"
    per_channel: bool = True
    #: onnxruntime: 7-bit weights, so the 16-bit accumulation of x86 CPUs without VNNI cannot saturate.
    #: None (default): only on such CPUs. It costs a little accuracy; false keeps 8 bits and risks saturation.
    reduce_range: bool | None = None
    #: static: representative inputs for calibration.
    calibration: DatasetSpec | None = None
    calibration_samples: int = Field(128, ge=1)
    #: ONNX op types to quantize (default: the backend's choice for the mode).
    op_types: list[str] | None = None

    @model_validator(mode="after")
    def _modes(self) -> QuantizeStep:
        valid = {
            "onnxruntime": ("auto", "dynamic", "static"),
            "torchao": ("auto", "weight_only", "dynamic", "bfloat16"),
        }
        if self.mode not in valid[self.backend]:
            raise ValueError(
                f"mode {self.mode!r} is not a mode of backend {self.backend!r}; "
                f"choose one of {', '.join(valid[self.backend])}"
            )
        if self.reduce_range is not None and self.backend != "onnxruntime":
            raise ValueError("reduce_range is an onnxruntime option; remove it for backend torchao")
        if self.mode == "static" and self.calibration is None:
            raise ValueError("mode 'static' needs calibration: {dataset: package.module:function}")
        return self


class StudentSpec(_Strict):
    factory: str
    kwargs: dict[str, Any] = {}

    _check = field_validator("factory")(check_import_path)


class DistillStep(_Strict):
    type: Literal["distill"]
    student: StudentSpec
    train: TrainSpec
    #: Softmax temperature of the soft targets; the soft loss is scaled by T².
    temperature: float = Field(4.0, gt=0)
    #: Weight of the soft (teacher) loss; 1 - alpha weighs the hard-label loss.
    alpha: float = Field(0.5, ge=0, le=1)
    #: The teacher output read as its prediction (default: the first floating-point output).
    teacher_output: str | None = None
    #: ``classifier`` serves the student's logits as (probabilities, label), like the training publisher.
    head: Literal["none", "classifier"] = "none"
    #: Train with this many seeds (train.seed, +1, …) and report the mean; the first seed's student is kept.
    seeds: int = Field(1, ge=1, le=20)
    #: Also train the same student without the teacher (alpha 0) on the same seeds and report both.
    baseline: bool = False


class ExportStep(_Strict):
    type: Literal["export"]
    format: Literal["onnx", "torch_export"]


Step = Annotated[PruneStep | QuantizeStep | DistillStep | ExportStep, Field(discriminator="type")]


class Recipe(_Strict):
    evaluation: EvaluationSpec | None = None
    steps: list[Step] = Field(min_length=1)
    description: str = ""


def _explain(err: ErrorDetails) -> str | None:
    """A step's ``type`` in the recipe's own words; every other problem in the loader's."""
    if err["type"] == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"unknown step type {tag!r}; valid step types: {', '.join(STEP_TYPES)}"
    if err["type"] == "union_tag_not_found":
        return f"a step needs a 'type' ({', '.join(STEP_TYPES)})"
    return None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate an already loaded recipe: a mapping with ``steps``, or a list of steps."""
    return configfile.parse(data, Recipe, what="recipe", source=source, list_key="steps", explain=_explain)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe (``yaml.safe_load`` only); errors name the file and line."""
    return configfile.load(path, Recipe, what="recipe", list_key="steps", explain=_explain)


def recipe_hash(recipe: Recipe) -> str:
    """``sha256:`` of the recipe's canonical JSON: the same settings hash alike however the YAML was written."""
    raw = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
