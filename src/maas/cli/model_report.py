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
    from maas.cli import backend

    backend.local_only("maas models report", "it reads the reports beside the local artifacts")
    from maas.cli.output import console, fail, print_json
    from maas.cli.report_view import plot, versions_table
    from maas.compression.report import version_points
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
    console.print(versions_table(points))
    out = output or Path(f"{name}-report.png")
    plot(points, f"{name}: size vs {points[0]['metric_name']} (colour: latency at batch 32)", out)
    console.print(f"plot written to {out}")
