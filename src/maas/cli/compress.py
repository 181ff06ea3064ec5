"""``maas compress``: a registered model through a recipe into a smaller, measured, registered version."""

from __future__ import annotations

from pathlib import Path

import typer


def compress(
    source: str = typer.Argument(..., help="The model to compress: models:/NAME/VERSION, models:/NAME@ALIAS or NAME."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="The recipe (YAML): evaluation and a list of steps."),
    name: str = typer.Option(..., "--name", "-n", help="Register the result as the next version of this model."),
    alias: str | None = typer.Option(None, "--alias", help="Point this alias at the new version."),
    max_metric_drop: float | None = typer.Option(
        None,
        "--max-metric-drop",
        help="Refuse to register when the metric falls by more than this (metric units: 0.01 = one accuracy point; "
        "a language model's metric is greedy agreement with its parent: 0.05 = 5 points).",
    ),
    report_json: Path | None = typer.Option(None, "--report-json", help="Also write the report to this JSON file."),
    device: str = typer.Option("cpu", "--device", help="Where training steps and measurements run: cpu, cuda, auto."),
    description: str = typer.Option("", "--description", help="The new version's description."),
) -> None:
    """Prune, quantize, distill or export a model by a recipe; measure it against its parent; register it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from maas.cli.output import console, err_console
    from maas.cli.report_view import table
    from maas.compression.pipeline import MetricDropTooLarge
    from maas.compression.pipeline import compress as run_compress
    from maas.compression.recipe import load_recipe

    plan = load_recipe(recipe)  # a bad recipe fails here, before anything is loaded
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as bar:

        def progress(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        try:
            result = run_compress(
                source,
                plan,
                name,
                alias=alias,
                max_metric_drop=max_metric_drop,
                description=description,
                device=device,
                progress=progress,
                report_path=report_json,
            )
        except MetricDropTooLarge as exc:
            bar.stop()
            console.print(table(exc.report))
            raise
    console.print(table(result.report))
    for note in result.report.notes:
        console.print(f"[yellow]note:[/] {note}")
    mv = result.version
    moved = f", alias {alias} -> {mv.version}" if alias else ""
    console.print(f"registered [bold]{mv.uri}[/] (parent {mv.lineage.parent}{moved}); serve it with `maas serve`")
    console.print(f"all versions compared: `maas models report {mv.name}`")
