"""What ``compress`` hands back, and the refusal it raises instead when the child's metric fell too far."""

from __future__ import annotations

from dataclasses import dataclass

from maas.compression.llm.report import LLMReport
from maas.compression.report import Report
from maas.errors import InvalidInput
from maas.registry import ModelVersion


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
