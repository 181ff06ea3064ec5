"""``compress``: a registered model through a recipe into a new, measured, registered version.

Everything that can be checked is checked before any work starts: the recipe, the child's name and
alias, the source URI, every import path the recipe names, and whether each step can take what the
step before it leaves (a plan over the candidate's kinds). Then the steps run in order in a scratch
directory, the child is saved, parent and child are measured side by side, ``max_metric_drop`` is
enforced, and only then is the child registered with its lineage (parent, recipe, report).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas.compression.candidate import Candidate, StepContext, save
from maas.compression.recipe import DistillStep, ExportStep, PruneStep, QuantizeStep, Recipe, load_recipe, parse_recipe
from maas.compression.report import EvalData, Report, compare, load_eval_data
from maas.errors import InvalidInput, NotFound
from maas.registry import ModelVersion, Registry
from maas.registry.uri import validate_alias, validate_name
from maas.imports import resolve

log = logging.getLogger(__name__)

#: step type -> "module:function" applying it, imported on first use.
STEPS: dict[str, str] = {
    "prune": "maas.compression.prune:apply",
    "quantize": "maas.compression.quantize:apply",
    "distill": "maas.compression.distill:apply",
    "export": "maas.compression.export:apply",
}

Progress = Callable[[str, int, int], None]


class MetricDropTooLarge(InvalidInput):
    """The child's metric fell by more than allowed; nothing was registered. ``report`` holds the numbers."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class CompressResult:
    version: ModelVersion
    report: Report


def _describe(i: int, step: Any) -> str:
    detail = {
        "prune": lambda s: f"{s.method} {s.amount:g}",
        "quantize": lambda s: f"{s.backend} {s.mode}",
        "distill": lambda s: s.student.factory,
        "export": lambda s: s.format,
    }[step.type](step)
    return f"steps[{i}] ({step.type} {detail})"


def plan(recipe: Recipe, source_format: str) -> list[str]:
    """The candidate's kind after each step; ``InvalidInput`` naming the first step that cannot take its input."""
    kind = {"onnx": "onnx", "torch_export": "torch", "hf_transformers": "hf"}.get(source_format)
    if kind is None:
        raise InvalidInput(
            f"cannot compress a model of format {source_format!r}; supported: onnx, torch_export, hf_transformers"
        )
    int8_onnx = int8_torch_dynamic = False
    kinds = []
    for i, step in enumerate(recipe.steps):
        where = _describe(i, step)

        def refuse(why: str, where: str = where) -> InvalidInput:
            return InvalidInput(f"{where}: {why}")

        if isinstance(step, PruneStep):
            if step.method == "structured" and step.target == "heads":
                if kind != "hf":
                    raise refuse("pruning attention heads needs a Hugging Face transformer (format hf_transformers)")
            elif kind == "hf":
                raise refuse("a Hugging Face transformer is pruned by heads: use method structured, target heads")
            elif int8_onnx:
                raise refuse("cannot prune a model after int8 quantization; prune first, then quantize")
            else:
                kind = "torch"
        elif isinstance(step, QuantizeStep):
            if step.backend == "torchao":
                if kind != "torch":
                    raise refuse(
                        f"torchao quantizes torch models, but the model is {kind} here; "
                        "use backend onnxruntime, or put the torchao step before any ONNX export"
                    )
                int8_torch_dynamic = int8_torch_dynamic or step.mode in ("dynamic", "auto")
            else:
                kind = "hf" if kind == "hf" else "onnx"
                int8_onnx = True
        elif isinstance(step, DistillStep):
            if kind == "hf":
                raise refuse("distillation needs a classifier teacher (torch or ONNX), not a Hugging Face encoder")
            kind = "torch"
        elif isinstance(step, ExportStep):
            if step.format == "torch_export" and kind == "hf":
                raise refuse("a Hugging Face model stays a Hugging Face directory; export it to onnx instead")
            if step.format == "torch_export" and int8_onnx:
                raise refuse(
                    "an int8 ONNX model cannot become a torch program; export to onnx, or quantize with torchao"
                )
            if step.format == "onnx" and int8_torch_dynamic:
                raise refuse(
                    "torchao dynamic int8 cannot be exported to ONNX (the exporter has no aten._int_mm); "
                    "use torchao mode weight_only, or quantize with backend onnxruntime after exporting"
                )
            if step.format == "torch_export":
                kind = "torch"
            elif kind != "hf":
                kind = "onnx"
        kinds.append(kind)
    return kinds


def _import_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(where, import path) for every path the recipe names."""
    found = []
    if recipe.evaluation is not None:
        found.append(("evaluation.dataset", recipe.evaluation.dataset))
    for i, step in enumerate(recipe.steps):
        if isinstance(step, PruneStep) and step.finetune is not None:
            found.append((f"steps[{i}].finetune.dataset", step.finetune.dataset))
        if isinstance(step, QuantizeStep) and step.calibration is not None:
            found.append((f"steps[{i}].calibration.dataset", step.calibration.dataset))
        if isinstance(step, DistillStep):
            found += [
                (f"steps[{i}].student.factory", step.student.factory),
                (f"steps[{i}].train.dataset", step.train.dataset),
            ]
    return found


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
    try:
        parent = registry.resolve(source)
    except NotFound as exc:
        raise NotFound(f"source {source!r} does not resolve: {exc}") from None
    for where, path in _import_paths(recipe):
        resolve(path, where)
    plan(recipe, parent.format)
    return parent


def _source_candidate(parent: ModelVersion, path: Path, ctx: StepContext) -> Candidate:
    if parent.format == "onnx":
        return Candidate(kind="onnx", signature=parent.signature, path=path, format="onnx")
    if parent.format == "torch_export":
        from maas.compression.candidate import example_tensors
        from maas.compression.graph_module import as_graph_module
        from maas.runtimes.torch_export import load_program

        # A loaded program's .module() refuses .eval()/.train(); a plain GraphModule owning its weights does not.
        module = as_graph_module(load_program(path).module(), example_tensors(ctx, parent.signature))
        return Candidate(kind="torch", signature=parent.signature, module=module, format="torch_export")
    from maas.runtimes.hf_archive import unpack

    return Candidate(kind="hf", signature=parent.signature, path=unpack(path), format="hf_transformers")


def _apply(step: Any, cand: Candidate, ctx: StepContext) -> Candidate:
    module_name, _, attr = STEPS[step.type].partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    out: Candidate = fn(step, cand, ctx)
    return out


def recipe_hash(recipe: Recipe) -> str:
    raw = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


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
    than ``max_metric_drop`` (in the metric's own units: 0.01 is one accuracy point).
    """
    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    registry = registry or Registry()
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
        cand = _source_candidate(parent, parent_path, ctx)
        for i, step in enumerate(recipe.steps):
            progress(_describe(i, step), i, len(recipe.steps))
            cand = _apply(step, cand, ctx)
            log.info("%s done", _describe(i, step))
        progress("steps", len(recipe.steps), len(recipe.steps))
        child_path, child_format = save(cand, ctx)

        from maas import runtimes

        parent_rt = runtimes.load(parent_path, parent.format, device=device)
        child_rt = runtimes.load(child_path, child_format, device=device)
        refs = [
            (label, (runtimes.load(path, fmt, device=device), path, fmt, None))
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
        version = registry.register(
            child_path,
            name,
            format=child_format,
            description=description or f"{parent.uri} compressed: " + "; ".join(cand.history),
            metrics=report.child_metrics(),
            alias=alias,
            parent=parent.uri,
            tags={"compressed_from": parent.uri},
            lineage_extra={
                "recipe": recipe.model_dump(mode="json"),
                "recipe_hash": recipe_hash(recipe),
                "parent_digest": parent.artifact_digest,
                "steps": cand.history,
                "compression_report": report.to_dict(),
            },
        )
    report.child.uri = version.uri
    return CompressResult(version=version, report=report)
