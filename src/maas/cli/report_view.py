"""Drawing compression reports: Rich tables for the terminal and a matplotlib plot of every version.

The library measures (:mod:`maas.compression.report`); this module only draws what it measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from maas.compression.llm.report import LLMReport
    from maas.compression.report import Measurement, Report


def _mb(n: float) -> str:
    """Bytes in the unit that keeps three significant digits readable (KB for small models, MB, GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def table(report: Report | LLMReport) -> Table:
    """Parent, any references, child, and child / parent for each measurement."""
    from rich.table import Table

    from maas.compression.llm.report import LLMReport

    if isinstance(report, LLMReport):
        return llm_table(report)
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


def llm_table(report: LLMReport) -> Table:
    """A language model's report: speed, size, perplexity and agreement, parent beside child."""
    from rich.table import Table

    p, c, r = report.parent, report.child, report.ratios()
    t = Table(title=f"compression report ({report.machine})", title_justify="left")
    for header in ("", f"parent {p.uri or ''}".strip(), "child", "child / parent"):
        t.add_column(header, justify="left" if not header else "right")
    t.add_row("runs as", p.runs_as, c.runs_as, "")
    t.add_row("size on disk", _mb(p.size_bytes), _mb(c.size_bytes), f"{r['size']:.3f}")
    t.add_row("weights in memory", _mb(p.weight_bytes), _mb(c.weight_bytes), f"{r['weight_bytes']:.3f}")
    t.add_row("parameters", f"{p.parameters:,}", f"{c.parameters:,}", "")
    for label, key in (("decode tokens/s, 1 sequence", "b1"), ("decode tokens/s, 8 sequences", "b8")):
        name = f"tokens_per_s_{key}"
        t.add_row(label, f"{getattr(p, name):,.1f}", f"{getattr(c, name):,.1f}", f"{r[name]:.2f}x")
    t.add_row("time per token, 1 sequence", f"{p.ms_per_token_b1:.1f} ms", f"{c.ms_per_token_b1:.1f} ms", "")
    t.add_row(
        "prefill tokens/s", f"{p.prefill_tokens_per_s:,.0f}", f"{c.prefill_tokens_per_s:,.0f}",
        f"{r['prefill_tokens_per_s']:.2f}x",
    )  # fmt: skip
    t.add_row("perplexity", f"{p.perplexity:.3f}", f"{c.perplexity:.3f}", f"{report.perplexity_change:+.2%}")
    t.add_row("greedy agreement", "100%", f"{c.metric:.2%}", f"drop {report.metric_drop:+.4f}")
    t.add_row("identical answers", "", f"{report.exact_match:.0%}", "")
    t.add_row("answer shared before first difference", "", f"{report.common_prefix:.0%}", "")
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
            _num(p, "latency_p50_ms_b1", "{:.3f}"),
            _num(p, "latency_p50_ms_b32", "{:.3f}"),
            _num(p, "throughput_b32", "{:,.0f}"),
            f"{p['metric_name']} {p['metric']:.4f}",
        )
    return t


def _num(row: Mapping[str, Any], key: str, fmt: str) -> str:
    """A timing of a version; ``-`` for a language model's row, measured in tokens/s instead."""
    return fmt.format(row[key]) if key in row else "-"


def plot(points: Sequence[Mapping[str, Any]], title: str, out: Path) -> Path:
    """Size (x) against the task metric (y), latency as the colour: one labelled point per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [p["size_bytes"] / 1e6 for p in points]
    ys = [p["metric"] for p in points]
    lat = [p.get("latency_p50_ms_b32", float("nan")) for p in points]
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="lightgrey")  # grey: no latency (language models)
    sc = ax.scatter(xs, ys, c=lat, cmap=cmap, s=90, edgecolors="black", linewidths=0.5)
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
