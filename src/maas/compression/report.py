"""Honest measurements of a parent and its compressed child, taken on the same machine in the same run.

For each model: size on disk, parameter count, in-process latency p50 at batch 1 and at batch 32,
throughput at batch 32, and the task metric on the recipe's evaluation dataset (accuracy when the data
has labels, else the mean cosine similarity of the model's outputs to the parent's). Timings of the two
models are interleaved round by round, so a busy machine slows both alike and the ratios stay fair.

The report holds numbers only; the CLI draws them (:mod:`maas.cli.report_view`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maas.compression.candidate import Progress
from maas.compression.evaluation import EvalData, accuracy, mean_cosine, metric_output, predict
from maas.compression.formats import Runtime
from maas.compression.recipe import EvaluationSpec
from maas.compression.sizes import artifact_size, count_parameters
from maas.errors import InvalidInput

if TYPE_CHECKING:
    from maas.registry.entities import ModelVersion


@dataclass
class Measurement:
    uri: str | None
    format: str
    size_bytes: int
    parameters: int
    latency_p50_ms_b1: float
    latency_p50_ms_b32: float
    throughput_b32: float  # samples per second at batch 32
    metric_name: str
    metric: float


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(calls: Sequence[Callable[[], object]], runs: int) -> list[list[float]]:
    """Seconds per call, each callable timed ``runs`` times, round-robin after two warm-up rounds.

    Each timed call follows an untimed call of the same model: ONNX Runtime's thread pool keeps spinning
    for a while after a call, and a different session called right then pays for that, which would make
    whichever model runs second look slower than it is.
    """
    for _ in range(2):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for i, call in enumerate(calls):
            call()
            times[i].append(_time(call))
    return times


# --- the comparison -----------------------------------------------------------------------------


@dataclass
class Report:
    parent: Measurement
    child: Measurement
    steps: list[str]
    notes: list[str] = field(default_factory=list)
    #: Intermediate models measured in the same run, e.g. ("fp32 before int8", its measurement).
    references: list[tuple[str, Measurement]] = field(default_factory=list)
    machine: str = field(default_factory=lambda: f"{platform.processor() or platform.machine()}, {_cpus()} CPUs")
    measured_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def metric_drop(self) -> float:
        return self.parent.metric - self.child.metric

    def ratios(self, against: Measurement | None = None) -> dict[str, float]:
        """Child / ``against`` (the parent by default) for size, parameters, latencies and throughput."""
        p, c = against or self.parent, self.child

        def r(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {
            "size": r(c.size_bytes, p.size_bytes),
            "parameters": r(c.parameters, p.parameters),
            "latency_b1": r(c.latency_p50_ms_b1, p.latency_p50_ms_b1),
            "latency_b32": r(c.latency_p50_ms_b32, p.latency_p50_ms_b32),
            "throughput_b32": r(c.throughput_b32, p.throughput_b32),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": asdict(self.parent),
            "child": asdict(self.child),
            "ratios": self.ratios(),
            "metric_drop": self.metric_drop,
            "references": [
                {"label": label, **asdict(m), "child_ratios": self.ratios(m)} for label, m in self.references
            ],
            "steps": list(self.steps),
            "notes": list(self.notes),
            "machine": self.machine,
            "measured_at": self.measured_at,
        }

    def child_metrics(self) -> dict[str, float]:
        """The child's numbers as registry metrics (flat name -> float)."""
        c = self.child
        ratios = self.ratios()
        return {
            c.metric_name: c.metric,
            "metric_drop": self.metric_drop,
            "size_bytes": float(c.size_bytes),
            "parameters": float(c.parameters),
            "latency_p50_ms_b1": c.latency_p50_ms_b1,
            "latency_p50_ms_b32": c.latency_p50_ms_b32,
            "throughput_b32": c.throughput_b32,
            "size_ratio": ratios["size"],
            "speedup_b32": 1 / ratios["latency_b32"] if ratios["latency_b32"] else float("nan"),
        }

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


Measured = tuple[Runtime, Path, str, str | None]  # (runtime, artifact path, format, uri)


def compare(
    parent: Measured,
    child: Measured,
    data: EvalData,
    spec: EvaluationSpec,
    *,
    steps: Sequence[str] = (),
    notes: Sequence[str] = (),
    references: Sequence[tuple[str, Measured]] = (),
    progress: Progress = lambda desc, done, total: None,
) -> Report:
    """Measure ``parent``, ``child`` and any labelled ``references`` on ``data``, interleaved."""
    p_rt, c_rt = parent[0], child[0]
    models = [parent, child, *(m for _, m in references)]
    output = metric_output(p_rt.signature, spec.output)
    if c_rt.signature.output(output) is None:
        raise InvalidInput(
            f"the compressed model has no output {output!r} (it returns "
            f"{', '.join(s.name for s in c_rt.signature.outputs)}); name the outputs like the parent's"
        )
    metric_name = spec.metric
    if metric_name == "auto":
        metric_name = "accuracy" if data.labels is not None else "cosine"
    if metric_name == "accuracy" and data.labels is None:
        raise InvalidInput(
            f"evaluation.metric is accuracy but {spec.dataset!r} has no labels; "
            "return (input, label) pairs, or use metric: cosine"
        )

    progress("evaluate", 0, 4)
    outs = [predict(m[0], data, output, spec.batch_size) for m in models]
    if metric_name == "accuracy":
        assert data.labels is not None
        metrics = [accuracy(o, data.labels) for o in outs]
    else:
        metrics = [1.0, *(mean_cosine(o, outs[0]) for o in outs[1:])]
    progress("evaluate", 2, 4)

    one, many = data.batch(1), data.batch(32)

    def calls(batch: dict[str, np.ndarray]) -> list[Callable[[], object]]:
        return [functools.partial(m[0].infer, batch) for m in models]

    b1 = _interleaved(calls(one), spec.latency_runs)
    progress("evaluate", 3, 4)
    b32 = _interleaved(calls(many), max(5, spec.latency_runs // 5))
    progress("evaluate", 4, 4)

    def measurement(i: int) -> Measurement:
        _, path, fmt, uri = models[i]
        l32 = statistics.median(b32[i])
        return Measurement(
            uri=uri,
            format=fmt,
            size_bytes=artifact_size(path),
            parameters=count_parameters(path, fmt),
            latency_p50_ms_b1=statistics.median(b1[i]) * 1e3,
            latency_p50_ms_b32=l32 * 1e3,
            throughput_b32=32 / l32,
            metric_name=metric_name,
            metric=metrics[i],
        )

    return Report(
        parent=measurement(0),
        child=measurement(1),
        steps=list(steps),
        notes=list(notes),
        references=[(label, measurement(2 + i)) for i, (label, _) in enumerate(references)],
    )


# --- every version of a model ----------------------------------------------------------------


def version_points(versions: Sequence[ModelVersion]) -> list[dict[str, Any]]:
    """One row per version that has measurements: its own (as a child), else a child's report of it (as a parent)."""
    measured: dict[int, dict[str, Any]] = {}
    parents: dict[int, dict[str, Any]] = {}
    for mv in versions:
        report = (mv.lineage.extra or {}).get("compression_report") if mv.lineage else None
        if not report:
            continue
        parent_version = _version_of(report["parent"].get("uri"), mv.name)
        measured[mv.version] = {**report["child"], "version": mv.version, "parent_version": parent_version}
        if parent_version is not None:
            parents.setdefault(parent_version, {**report["parent"], "version": parent_version, "parent_version": None})
    for v, row in parents.items():
        measured.setdefault(v, row)
    return [measured[v] for v in sorted(measured)]


def _version_of(uri: str | None, name: str) -> int | None:
    prefix = f"models:/{name}/"
    if uri and uri.startswith(prefix) and uri[len(prefix) :].isdigit():
        return int(uri[len(prefix) :])
    return None
