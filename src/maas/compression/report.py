"""Honest measurements of a parent and its compressed child, taken on the same machine in the same run.

For each model: size on disk, parameter count, in-process latency p50 at batch 1 and at batch 32,
throughput at batch 32, and the task metric on the recipe's evaluation dataset (accuracy when the data
has labels, else the mean cosine similarity of the model's outputs to the parent's). Timings of the two
models are interleaved round by round, so a busy machine slows both alike and the ratios stay fair.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from maas.compression.recipe import EvaluationSpec
from maas.errors import InvalidInput
from maas.runtimes.base import Runtime
from maas.tensors import Signature, numpy_dtype
from maas.imports import resolve

Progress = Callable[[str, int, int], None]


# --- evaluation data ----------------------------------------------------------------------------


@dataclass
class EvalData:
    """The evaluation dataset as model inputs (keyed by signature input name) and labels (or None)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, size: int, start: int = 0) -> dict[str, np.ndarray]:
        """``size`` rows from ``start``, wrapping around (so a batch of 32 exists even for 10 examples)."""
        n = len(self)
        idx = (np.arange(size) + start) % n
        return {k: v[idx] for k, v in self.inputs.items()}


def _as_array(values: Sequence[Any], datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        return np.array(flat, dtype=object)
    arrays = [np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for v in values]
    return np.stack(arrays).astype(numpy_dtype(datatype), copy=False)


def load_eval_data(spec: EvaluationSpec, signature: Signature) -> EvalData:
    """Call the dataset factory and shape its items for ``signature``: texts, inputs, or (inputs…, label)."""
    data = resolve(spec.dataset, "evaluation.dataset")(**spec.kwargs)
    try:
        n = len(data)
    except TypeError:
        raise InvalidInput(
            f"evaluation.dataset {spec.dataset!r} returned a {type(data).__name__}, which has no length; "
            "return a list of texts or a map-style dataset of (input, label) pairs"
        ) from None
    if n == 0:
        raise InvalidInput(f"evaluation.dataset {spec.dataset!r} is empty")
    n = min(n, spec.limit or n)
    items = [data[i] for i in range(n)]
    n_in = len(signature.inputs)
    if isinstance(items[0], str | bytes):
        rows: list[tuple[Any, ...]] = [(item,) for item in items]
    else:
        rows = [tuple(item) if isinstance(item, tuple | list) else (item,) for item in items]
    width = len(rows[0])
    if width not in (n_in, n_in + 1):
        raise InvalidInput(
            f"evaluation.dataset items have {width} parts; the model takes {n_in} input(s) "
            f"({', '.join(s.name for s in signature.inputs)}), "
            "so items must be the inputs, optionally followed by a label"
        )
    inputs = {
        spec_.name: _as_array([row[i] for row in rows], spec_.datatype) for i, spec_ in enumerate(signature.inputs)
    }
    labels = None
    if width == n_in + 1:
        labels = np.asarray([np.asarray(row[-1].item() if hasattr(row[-1], "item") else row[-1]) for row in rows])
    return EvalData(inputs=inputs, labels=labels)


# --- one model's numbers ------------------------------------------------------------------------


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


def artifact_size(path: Path) -> int:
    """Bytes on disk: the file, or every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def count_parameters(path: Path, format: str) -> int:
    """Weights in the artifact, counted as elements (an int8 weight counts once, like its fp32 parent)."""
    if format == "onnx" or (format == "hf_transformers" and _hf_onnx(path) is not None):
        import onnx

        model = onnx.load(str(_hf_onnx(path) or path), load_external_data=False)
        total = 0
        for init in model.graph.initializer:
            if init.data_type in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.FLOAT16,
                onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8,
                onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE,
            ):
                count = int(np.prod(init.dims)) if init.dims else 1
                if count > 1:  # scalars are scales and zero points, not weights
                    total += count
        return total
    if format == "torch_export":
        from maas.runtimes.torch_export import load_program  # the archive is checked first: nothing pickled loads

        program = load_program(path)
        return sum(int(t.numel()) for t in program.state_dict.values())
    if format == "hf_transformers":
        from safetensors import safe_open

        root = _hf_dir(path)
        total = 0
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="np") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    total += int(np.prod(st.get_slice(key).get_shape()))
        return total
    raise InvalidInput(f"cannot count the parameters of format {format!r}")


def _hf_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    from maas.runtimes.hf_archive import unpack

    return unpack(path)


def _hf_onnx(path: Path) -> Path | None:
    if path.is_file() and not zipfile.is_zipfile(path):
        return None
    try:
        f = _hf_dir(path) / "model.onnx"
    except Exception:
        return None
    return f if f.is_file() else None


def _metric_output(signature: Signature, wanted: str | None) -> str:
    if wanted is not None:
        if signature.output(wanted) is None:
            raise InvalidInput(
                f"evaluation.output {wanted!r} is not an output of the model; it returns "
                + ", ".join(s.name for s in signature.outputs)
            )
        return wanted
    for s in signature.outputs:
        if s.datatype in ("FP32", "FP64", "FP16", "BF16"):
            return s.name
    return signature.outputs[0].name


def _predict(runtime: Runtime, data: EvalData, output: str, batch_size: int) -> np.ndarray:
    parts = []
    for start in range(0, len(data), batch_size):
        size = min(batch_size, len(data) - start)
        parts.append(np.asarray(runtime.infer(data.batch(size, start), [output])[output]))
    return np.concatenate(parts)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of scores (argmax over the last axis) or of predicted labels."""
    predicted = outputs.argmax(axis=-1) if outputs.ndim > labels.ndim else outputs
    return float((predicted.reshape(labels.shape) == labels).mean())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (flattened past the batch dimension)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


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
    import os

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
    output = _metric_output(p_rt.signature, spec.output)
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
    outs = [_predict(m[0], data, output, spec.batch_size) for m in models]
    if metric_name == "accuracy":
        assert data.labels is not None
        metrics = [accuracy(o, data.labels) for o in outs]
    else:
        metrics = [1.0, *(mean_cosine(o, outs[0]) for o in outs[1:])]
    progress("evaluate", 2, 4)

    one, many = data.batch(1), data.batch(32)

    def calls(batch: dict[str, np.ndarray]) -> list[Callable[[], object]]:
        return [lambda rt=m[0]: rt.infer(batch) for m in models]

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


# --- presenting ---------------------------------------------------------------------------------


def _mb(n: float) -> str:
    """Bytes in the unit that keeps three significant digits readable (KB for small models, MB, GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def table(report: Report) -> Any:
    """A Rich table: parent, any references, child, and child / parent for each measurement."""
    from rich.table import Table

    p, c, r = report.parent, report.child, report.ratios()
    refs = report.references
    t = Table(title=f"compression report ({report.machine})", title_justify="left")
    t.add_column("")
    t.add_column(f"parent {p.uri or ''}".strip(), justify="right")
    for label, _ in refs:
        t.add_column(label, justify="right")
    t.add_column("child", justify="right")
    t.add_column("child / parent", justify="right")
    for label, _ in refs:
        t.add_column(f"child / {label}", justify="right")
    ms = [p, *(m for _, m in refs), c]
    ref_ratios = [report.ratios(m) for _, m in refs]

    def row(name: str, cell: Callable[[Measurement], str], key: str | None) -> None:
        ratio = [f"{r[key]:.3f}" if key else "", *(f"{rr[key]:.3f}" if key else "" for rr in ref_ratios)]
        t.add_row(name, *(cell(m) for m in ms), *ratio)

    row("format", lambda m: m.format, None)
    row("size on disk", lambda m: _mb(m.size_bytes), "size")
    row("parameters", lambda m: f"{m.parameters:,}", "parameters")
    row("latency p50, batch 1", lambda m: f"{m.latency_p50_ms_b1:.3f} ms", "latency_b1")
    row("latency p50, batch 32", lambda m: f"{m.latency_p50_ms_b32:.3f} ms", "latency_b32")
    row("throughput, batch 32", lambda m: f"{m.throughput_b32:,.0f}/s", "throughput_b32")
    drops = [f"drop {report.metric_drop:+.4f}", *(f"drop {m.metric - c.metric:+.4f}" for _, m in refs)]
    t.add_row(p.metric_name, *(f"{m.metric:.4f}" for m in ms), *drops)
    return t


def version_points(versions: Sequence[Any]) -> list[dict[str, Any]]:
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


def plot(points: Sequence[Mapping[str, Any]], title: str, out: Path) -> Path:
    """Size (x) against the task metric (y), latency as the colour: one labelled point per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [p["size_bytes"] / 1e6 for p in points]
    ys = [p["metric"] for p in points]
    lat = [p["latency_p50_ms_b32"] for p in points]
    sc = ax.scatter(xs, ys, c=lat, cmap="viridis_r", s=90, edgecolors="black", linewidths=0.5)
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"v{p['version']}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    by_version = {p["version"]: p for p in points}
    for p in points:
        parent = by_version.get(p.get("parent_version"))
        if parent is not None:  # an arrow from each parent to its child
            ax.annotate(
                "",
                xy=(p["size_bytes"] / 1e6, p["metric"]),
                xytext=(parent["size_bytes"] / 1e6, parent["metric"]),
                arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8},
            )
    fig.colorbar(sc, ax=ax, label="latency p50 at batch 32 (ms)")
    metric_names = {p["metric_name"] for p in points}
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(" / ".join(sorted(metric_names)))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
