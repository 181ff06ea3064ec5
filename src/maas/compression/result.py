"""What ``compress`` hands back, and the refusal it raises instead when the child's metric fell too far."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maas.compression.llm.report import LLMReport
from maas.compression.recipe import Recipe, recipe_hash
from maas.compression.report import Report
from maas.errors import InvalidInput
from maas.registry import ModelVersion, Registry


class MetricDropTooLarge(InvalidInput):
    """The child's metric fell by more than allowed; nothing was registered. ``report`` holds the numbers."""

    def __init__(self, message: str, report: Report | LLMReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class CompressResult:
    version: ModelVersion
    #: :class:`~maas.compression.report.Report`; :class:`~maas.compression.llm.report.LLMReport` for a causal_lm.
    report: Report | LLMReport


def register_child(
    registry: Registry,
    path: Path,
    name: str,
    format: str,
    parent: ModelVersion,
    recipe: Recipe,
    report: Report | LLMReport,
    steps: list[str],
    *,
    alias: str | None,
    description: str,
) -> ModelVersion:
    """Register a compressed child as the next version of ``name``, with its lineage: the parent, the recipe and its
    hash, the parent's digest, the steps and the report."""
    return registry.register(
        path,
        name,
        format=format,
        description=description or f"{parent.uri} compressed: " + "; ".join(steps),
        metrics=report.child_metrics(),
        alias=alias,
        parent=parent.uri,
        tags={"compressed_from": parent.uri},
        lineage_extra={
            "recipe": recipe.model_dump(mode="json"),
            "recipe_hash": recipe_hash(recipe),
            "parent_digest": parent.artifact_digest,
            "steps": list(steps),
            "compression_report": report.to_dict(),
        },
    )
