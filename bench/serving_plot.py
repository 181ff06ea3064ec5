"""The serving benchmark's plot: throughput against p99 latency, one line per mode, points labelled with the
number of connections; the in-process ceiling (batch 1) as a vertical line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loadgen import Point


def plot(points: Sequence[Point], ceiling_rows_per_s: float | None, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    modes = list(dict.fromkeys(p.mode for p in points))
    for mode in modes:
        mine = sorted((p for p in points if p.mode == mode), key=lambda p: p.connections)
        xs, ys = [p.requests_per_s for p in mine], [p.p99_ms for p in mine]
        (line,) = ax.plot(xs, ys, marker="o", label=mode)
        for p in mine:
            ax.annotate(
                str(p.connections),
                (p.requests_per_s, p.p99_ms),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color=line.get_color(),
            )
    if ceiling_rows_per_s:
        ax.axvline(ceiling_rows_per_s, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"in-process batch 1: {ceiling_rows_per_s:,.0f}/s",
            (ceiling_rows_per_s, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-4, -12),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="grey",
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlim(left=0)
    ax.set_xlabel("throughput (requests/s, one row each)")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="mode (labels: connections)", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
