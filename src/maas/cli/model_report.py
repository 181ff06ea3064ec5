"""``maas models report NAME``: every measured version of a model, as a table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    name: str = typer.Argument(..., help="The model whose versions to compare."),
    output: Path | None = typer.Option(None, "--output", "-o", help="The PNG to write (default: NAME-report.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurements as JSON (no plot)."),
) -> None:
    """Size, parameters, latency and metric of every version measured by `maas compress`, plotted."""
    from rich.table import Table

    from maas.cli.output import console, fail, print_json
    from maas.compression.report import plot, version_points
    from maas.registry import Registry

    reg = Registry()
    points = version_points(reg.list_versions(name))
    if as_json:
        print_json(points)
        return
    if not points:
        fail(
            f"no version of {name!r} has compression measurements; create one with `maas compress {name} --recipe ...`"
        )
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
    console.print(t)
    out = output or Path(f"{name}-report.png")
    plot(points, f"{name}: size vs {points[0]['metric_name']} (colour: latency at batch 32)", out)
    console.print(f"plot written to {out}")
