"""The serving benchmark's results: the best round of each point, its ratios, the tables (console and
markdown), ``results/serving.json`` and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadgen import Point
from reference import Loop
from rich import box
from rich.console import Console
from rich.table import Table
from serving_plot import plot

import report

NAME = "serving"
HEADERS = ("mode", "conns", "req/s", "p50 ms", "p99 ms", "vs ceiling", "vs naive")
CEILING_HEADERS = ("in-process", "rows/s", "p50 µs", "p99 µs")


def best(points: Sequence[tuple[int, Point]], modes: Sequence[str]) -> list[Point]:
    """Per mode and connection count, the round with the most req/s (interference only slows a run down),
    in ``modes`` order, then by connections."""
    found: dict[tuple[str, int], Point] = {}
    for _, p in points:
        key = (p.mode, p.connections)
        if key not in found or p.requests_per_s > found[key].requests_per_s:
            found[key] = p
    order = {mode: i for i, mode in enumerate(modes)}
    return sorted(found.values(), key=lambda p: (order[p.mode], p.connections))


def best_ceiling(ceilings: Sequence[dict[str, Loop]]) -> dict[str, Loop]:
    """Per in-process loop, the round with the most rows/s."""
    return {key: max((c[key] for c in ceilings), key=lambda loop: loop.rows_per_s) for key in ceilings[0]}


def with_ratios(points: Sequence[Point], ceiling_rows_per_s: float, baseline: str) -> list[dict[str, Any]]:
    """Each point with its req/s over the in-process ceiling, and over ``baseline`` at the same connections."""
    base = {p.connections: p.requests_per_s for p in points if p.mode == baseline}
    return [
        {
            **asdict(p),
            "vs_ceiling": p.requests_per_s / ceiling_rows_per_s,
            "vs_naive": p.requests_per_s / base[p.connections] if p.connections in base else None,
        }
        for p in points
    ]


def _cells(row: dict[str, Any]) -> list[str]:
    vs_naive = row["vs_naive"]
    return [
        row["mode"],
        str(row["connections"]),
        f"{row['requests_per_s']:,.0f}",
        f"{row['p50_ms']:.2f}",
        f"{row['p99_ms']:.2f}",
        f"{row['vs_ceiling']:.3f}x",
        "—" if vs_naive is None else f"{vs_naive:.2f}x",
    ]


def _ceiling_cells(loop: Loop) -> list[str]:
    return [loop.name, f"{loop.rows_per_s:,.0f}", f"{loop.p50_us:.1f}", f"{loop.p99_us:.1f}"]


def _console_table(title: str, headers: Sequence[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _notes(config: dict[str, Any], skipped: dict[str, str]) -> str:
    batching = config["batching"]
    lines = [
        f"- dynamic batching: {'on' if batching['on'] else 'off'} ({batching['how']})",
        f"- maas serve ran {config.get('maas_workers', 1)} worker process(es) (`--workers`; BENCH_MAAS_WORKERS)",
        f"- load generators: {config['tools']}, sharing this machine's CPUs with the server",
        "- vs ceiling: req/s over in-process `session.run` rows/s at batch 1; vs naive: over the naive FastAPI "
        "server's req/s at the same connection count",
    ]
    lines += [f"- {mode}: not measured: {reason}" for mode, reason in skipped.items()]
    return "\n".join(lines)


def publish(
    console: Console,
    *,
    machine: dict[str, Any],
    config: dict[str, Any],
    ceilings: Sequence[dict[str, Loop]],
    points: Sequence[tuple[int, Point]],
    skipped: dict[str, str],
    baseline: str,
) -> list[Path]:
    """Print the tables; write ``serving.json``, ``serving.png`` and this machine's section of ``serving.md``."""
    ceiling = best_ceiling(ceilings)
    ceiling_rows = ceiling["batch1"].rows_per_s
    chosen = best(points, list(config["modes"]))
    rows = with_ratios(chosen, ceiling_rows, baseline)
    title = f"{config['model']}; {config['seconds_per_point']:g} s per point, best of {config['rounds']}"
    ceiling_rows_cells = [_ceiling_cells(c) for c in ceiling.values()]
    console.print(_console_table("In-process ceiling", CEILING_HEADERS, ceiling_rows_cells))
    console.print(_console_table(title, HEADERS, [_cells(r) for r in rows]))
    notes = _notes(config, skipped)
    console.print(notes)

    payload = {
        "benchmark": NAME,
        "machine": machine,
        "config": config,
        "ceiling": {key: {**asdict(loop), "rows_per_s": loop.rows_per_s} for key, loop in ceiling.items()},
        "results": rows,
        "rounds": [{"round": r, **asdict(p)} for r, p in points],
        "ceiling_rounds": [{key: asdict(loop) for key, loop in c.items()} for c in ceilings],
        "skipped": skipped,
    }
    json_path = report.write_json(NAME, payload)
    png_path = plot(chosen, ceiling_rows, report.RESULTS / f"{NAME}.png", title)
    body = (
        f"Run {machine['timestamp']} on {machine['platform']}; Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}, maas {machine['maas']}. {title}. Plot of the latest run: "
        f"[serving.png](serving.png).\n\n"
        + report.markdown_table(CEILING_HEADERS, ceiling_rows_cells)
        + "\n\n"
        + report.markdown_table(HEADERS, [_cells(r) for r in rows])
        + "\n\n"
        + notes
    )
    md_path = report.write_markdown_section(NAME, "Serving benchmark", report.machine_key(machine), body)
    return [json_path, md_path, png_path]
