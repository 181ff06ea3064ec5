"""``compress``: a registered model through a recipe into a new, measured, registered version.

Everything that can be checked is checked before any work starts: the recipe, the child's name and
alias, the source URI, every import path the recipe names, and whether each step can take what the
step before it leaves (a plan over the candidate's kinds). Then the steps run in order in a scratch
directory, the child is saved, parent and child are measured side by side, ``max_metric_drop`` is
enforced, and only then is the child registered with its lineage (parent, recipe, report).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from maas.compression import formats
from maas.compression.candidate import Kind, Progress, StepContext, from_artifact, save
from maas.compression.evaluation import EvalData, load_eval_data
from maas.compression.recipe import QuantizeStep, Recipe, Step, load_recipe, parse_recipe
from maas.compression.report import compare
from maas.compression.result import CompressResult as CompressResult
from maas.compression.result import MetricDropTooLarge as MetricDropTooLarge
from maas.compression.result import register_child
from maas.compression.steps import step_type
from maas.compression.steps.base import Planned
from maas.errors import InvalidInput, NotFound
from maas.imports import resolve
from maas.registry import ModelVersion, Registry
from maas.registry.uri import validate_alias, validate_name

log = logging.getLogger(__name__)

#: registry format -> the kind of candidate a recipe starts from.
SOURCE_KINDS: dict[str, Kind] = {"onnx": "onnx", "torch_export": "torch", "hf_transformers": "hf"}


def _describe(i: int, step: Step) -> str:
    return f"steps[{i}] ({step.type} {step_type(step.type).describe(step)})"


def plan(recipe: Recipe, source_format: str) -> list[Kind]:
    """The candidate's kind after each step; ``InvalidInput`` naming the first step that cannot take its input."""
    kind = SOURCE_KINDS.get(source_format)
    if kind is None:
        raise InvalidInput(
            f"cannot compress a model of format {source_format!r}; supported: onnx, torch_export, hf_transformers"
        )
    state = Planned(kind)
    kinds = []
    for i, step in enumerate(recipe.steps):
        impl = step_type(step.type)
        if isinstance(step, QuantizeStep) and step.mode == "bfloat16":
            raise InvalidInput(f"{_describe(i, step)}: mode bfloat16 is for causal_lm models; use weight_only, dynamic")
        why = impl.accepts(step, state)
        if why is not None:
            raise InvalidInput(f"{_describe(i, step)}: {why}")
        state = impl.produces(step, state)
        kinds.append(state.kind)
    return kinds


def check(
    source: str, recipe: Recipe, name: str, *, alias: str | None, max_metric_drop: float | None, registry: Registry
) -> ModelVersion:
    """Every check that needs no work: returns the source version."""
    validate_name(name)
    if alias is not None:
        validate_alias(alias)
    if max_metric_drop is not None and not max_metric_drop >= 0:
        raise InvalidInput(f"--max-metric-drop must be a number >= 0 (in the metric's units), got {max_metric_drop}")
    if recipe.evaluation is None:
        raise InvalidInput(
            "the recipe has no evaluation: add `evaluation: {dataset: package.module:function}` so parent and child "
            "can be measured (accuracy needs (input, label) pairs; texts are compared by cosine)"
        )
    if recipe.evaluation.new_tokens is not None:
        raise InvalidInput("evaluation.new_tokens is for causal_lm models (new tokens per prompt); remove it")
    try:
        parent = registry.resolve(source)
    except NotFound as exc:
        raise NotFound(f"source {source!r} does not resolve: {exc}") from None
    resolve(recipe.evaluation.dataset, "evaluation.dataset")
    for i, step in enumerate(recipe.steps):
        step_type(step.type).validate(step, f"steps[{i}]")
    plan(recipe, parent.format)
    return parent


def _format_of(source: str, registry: Registry) -> str | None:
    try:
        return registry.resolve(source).format
    except (NotFound, InvalidInput):
        return None  # check() says what is wrong with it


def compress(
    source: str,
    recipe: Recipe | str | Path | dict[str, Any],
    name: str,
    *,
    alias: str | None = None,
    max_metric_drop: float | None = None,
    description: str = "",
    device: str = "cpu",
    registry: Registry | None = None,
    progress: Progress = lambda desc, done, total: None,
    report_path: Path | None = None,
) -> CompressResult:
    """Apply ``recipe`` to the model ``source`` names and register the result as the next version of ``name``.

    Raises ``InvalidInput``/``NotFound`` before any work when something is wrong, and
    :class:`MetricDropTooLarge` (with the report) instead of registering a child whose metric fell by more
    than ``max_metric_drop`` (in the metric's own units: 0.01 is one accuracy point). A ``causal_lm`` parent goes
    to :func:`maas.compression.llm.run.compress_llm` (one quantize step; the metric is greedy agreement).
    """
    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    registry = registry or Registry()
    if _format_of(source, registry) == "causal_lm":  # language models: their own steps and measurements
        from maas.compression.llm.run import compress_llm

        return compress_llm(
            source, recipe, name, alias=alias, max_metric_drop=max_metric_drop, description=description,
            registry=registry, progress=progress, report_path=report_path,
        )  # fmt: skip
    parent = check(source, recipe, name, alias=alias, max_metric_drop=max_metric_drop, registry=registry)
    assert recipe.evaluation is not None
    parent_path = registry.artifact_path(parent)
    data: EvalData = load_eval_data(recipe.evaluation, parent.signature)

    with tempfile.TemporaryDirectory(prefix="maas-compress-") as scratch:
        ctx = StepContext(
            workdir=Path(scratch),
            example_inputs=data.batch(min(4, len(data))),
            device=device,
            evaluation=recipe.evaluation,
            progress=progress,
        )
        cand = from_artifact(parent_path, parent.format, parent.signature, ctx)
        for i, step in enumerate(recipe.steps):
            progress(_describe(i, step), i, len(recipe.steps))
            cand = step_type(step.type).apply(step, cand, ctx)
            log.info("%s done", _describe(i, step))
        progress("steps", len(recipe.steps), len(recipe.steps))
        child_path, child_format = save(cand, ctx)

        parent_rt = formats.load(parent_path, parent.format, device=device)
        child_rt = formats.load(child_path, child_format, device=device)
        refs = [
            (label, (formats.load(path, fmt, device=device), path, fmt, None))
            for label, path, fmt in cand.references
            if path.exists() and path.resolve() != parent_path.resolve()
        ]
        try:
            report = compare(
                (parent_rt, parent_path, parent.format, parent.uri),
                (child_rt, child_path, child_format, None),
                data,
                recipe.evaluation,
                steps=cand.history,
                notes=cand.notes,
                references=refs,
                progress=progress,
            )
        finally:
            for rt in (parent_rt, child_rt, *(m[0] for _, m in refs)):
                rt.close()
        if report_path is not None:
            report.write_json(report_path)
        if max_metric_drop is not None and report.metric_drop > max_metric_drop:
            m = report.parent.metric_name
            raise MetricDropTooLarge(
                f"refused to register: {m} fell by {report.metric_drop:.4f} ({report.parent.metric:.4f} -> "
                f"{report.child.metric:.4f}), more than --max-metric-drop {max_metric_drop:g}; nothing was registered",
                report,
            )
        version = register_child(
            registry,
            child_path,
            name,
            child_format,
            parent,
            recipe,
            report,
            cand.history,
            alias=alias,
            description=description,
        )
    report.child.uri = version.uri
    return CompressResult(version=version, report=report)
