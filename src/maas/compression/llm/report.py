"""A language model's compression report: numbers only (the CLI draws them, :mod:`maas.cli.report_view`).

Its ``to_dict`` keeps the keys every compression report has (``parent``/``child`` with ``uri``, ``format``,
``size_bytes``, ``parameters``, ``metric_name``, ``metric``; ``metric_drop``), so the registry's lineage and
``maas models report`` read it like the others. The metric is greedy agreement (:mod:`.measure`): 1.0 for the
parent by definition, so ``metric_drop`` is the fraction of positions where the child's next token differs.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

METRIC = "greedy_agreement"


@dataclass
class LLMMeasurement:
    uri: str | None
    format: str
    #: How the model computes: ``float32``, ``bfloat16``, or ``int8 weights, bfloat16 activations``.
    runs_as: str
    size_bytes: int  # the artifact on disk
    weight_bytes: int  # its weights in memory, once loaded
    parameters: int
    #: Decoding throughput (new tokens per second, prompts prefilled beforehand) with 1 and 8 sequences.
    tokens_per_s_b1: float
    tokens_per_s_b8: float
    #: One decoding step of one sequence, median of the rounds.
    ms_per_token_b1: float
    #: Prompt tokens per second while prefilling the 8 prompts one by one.
    prefill_tokens_per_s: float
    perplexity: float
    metric: float
    metric_name: str = METRIC


@dataclass
class LLMReport:
    parent: LLMMeasurement
    child: LLMMeasurement
    steps: list[str]
    #: Answers to the prompts that are identical, token for token, when each model generates on its own.
    exact_match: float
    #: Mean share of each answer the two models generate identically before their first difference.
    common_prefix: float
    #: The setting of each measurement: prompts, new tokens, texts and their tokens, rounds, threads.
    settings: dict[str, int]
    notes: list[str] = field(default_factory=list)
    machine: str = field(default_factory=lambda: f"{platform.processor() or platform.machine()}, {_cpus()} CPUs")
    measured_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: str = "causal_lm"

    @property
    def metric_drop(self) -> float:
        return self.parent.metric - self.child.metric

    @property
    def perplexity_change(self) -> float:
        """Child perplexity / parent perplexity - 1 (0.02: 2% higher)."""
        return self.child.perplexity / self.parent.perplexity - 1

    def ratios(self) -> dict[str, float]:
        p, c = self.parent, self.child

        def r(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {
            "size": r(c.size_bytes, p.size_bytes),
            "weight_bytes": r(c.weight_bytes, p.weight_bytes),
            "tokens_per_s_b1": r(c.tokens_per_s_b1, p.tokens_per_s_b1),
            "tokens_per_s_b8": r(c.tokens_per_s_b8, p.tokens_per_s_b8),
            "prefill_tokens_per_s": r(c.prefill_tokens_per_s, p.prefill_tokens_per_s),
            "perplexity": r(c.perplexity, p.perplexity),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "parent": asdict(self.parent),
            "child": asdict(self.child),
            "ratios": self.ratios(),
            "metric_drop": self.metric_drop,
            "perplexity_change": self.perplexity_change,
            "exact_match": self.exact_match,
            "common_prefix": self.common_prefix,
            "settings": dict(self.settings),
            "steps": list(self.steps),
            "notes": list(self.notes),
            "machine": self.machine,
            "measured_at": self.measured_at,
        }

    def child_metrics(self) -> dict[str, float]:
        """The child's numbers as registry metrics (flat name -> float)."""
        c = self.child
        return {
            METRIC: c.metric,
            "metric_drop": self.metric_drop,
            "perplexity": c.perplexity,
            "perplexity_parent": self.parent.perplexity,
            "exact_match": self.exact_match,
            "size_bytes": float(c.size_bytes),
            "weight_bytes": float(c.weight_bytes),
            "parameters": float(c.parameters),
            "tokens_per_s_b1": c.tokens_per_s_b1,
            "tokens_per_s_b8": c.tokens_per_s_b8,
            "ms_per_token_b1": c.ms_per_token_b1,
            "size_ratio": self.ratios()["size"],
        }

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
