"""Drawing compression reports: Rich tables for the terminal and a matplotlib plot of every version.

The library measures (:mod:`maas.compression.report`); this module only draws what it measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from maas.compression.report import Measurement, Report


def _mb(n: float) -> str:
    """Bytes in the unit that keeps three significant digits readable (KB for small models, MB, GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def table(report: Report) -> Table:
    """Parent, any references, child, and child / parent for each measurement."""
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


def versions_table(points: Sequence[Mapping[str, Any]]) -> Table:
    """One row per measured version (:func:`maas.compression.report.version_points`)."""
    from rich.table import Table

    t = Table(
        "version", "parent", "format", "size (MB)", "parameters", "p50 b1 (ms)", "p50 b32 (ms)", "b32/s", "metric"
    )
    for p in points:
        t.add_row(
            str(p["version"]),
            str(p["parent_version"] or "-"),
            p["format"],
            f"{p['size_bytes'] / 1e6:,.3f}",
            f"{p['parameters']:,}",
            f"{p['latency_p50_ms_b1']:.3f}",
            f"{p['latency_p50_ms_b32']:.3f}",
            f"{p['throughput_b32']:,.0f}",
            f"{p['metric_name']} {p['metric']:.4f}",
        )
    return t


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
