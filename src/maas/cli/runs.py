"""``maas runs …``: list training runs and show one with its config, metrics and checkpoints."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from maas.cli.output import console, print_json
from maas.registry import RUN_STATUSES, Registry, Run

app = typer.Typer(help="Inspect training runs.", no_args_is_help=True)


@app.callback()
def _local() -> None:
    from maas.cli import backend

    backend.local_only("maas runs", "runs are recorded where they train; the admin API does not serve them")


_STYLE = {"succeeded": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}


def _status(run: Run) -> str:
    style = _STYLE.get(run.status)
    return f"[{style}]{run.status}[/]" if style else run.status


def _when(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M}" if dt else "-"


def _duration(run: Run) -> str:
    if run.started_at is None:
        return "-"
    seconds = int(((run.ended_at or datetime.now(UTC)) - run.started_at).total_seconds())
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    text = f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
    return text if run.ended_at else f"{text}…"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _metrics(metrics: dict[str, float]) -> str:
    return escape(", ".join(f"{k}={_num(v)}" for k, v in metrics.items())) or "-"


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip() if data else "{}"


@app.command("list")
def list_runs(
    status: str | None = typer.Option(
        None, "--status", "-s", help=f"Only runs in this status: {', '.join(RUN_STATUSES)}."
    ),
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many runs, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List training runs, newest first."""
    runs = Registry().runs.list_runs(limit=limit, status=status)
    if as_json:
        print_json([r.to_dict() for r in runs])
        return
    if not runs:
        console.print(f"No training runs with status {status}." if status else "No training runs yet.")
        return
    table = Table(
        "id", "name", "status", "strategy", "world size", "steps", "loss", "eval", "started", "duration", "model"
    )
    for r in runs:
        table.add_row(
            r.id[:12],
            escape(r.name or "-"),
            _status(r),
            escape(r.strategy),
            str(r.world_size),
            str(r.last_step) if r.last_step is not None else "-",
            _num(r.last_loss),
            _metrics(r.eval_metrics),
            _when(r.started_at),
            _duration(r),
            escape(r.model_uri or "-"),
        )
    console.print(table)


@app.command("show")
def show(
    run_id: str = typer.Argument(..., help="The run's id, or a unique prefix of at least 6 characters."),
    steps: int = typer.Option(10, "--steps", help="Show this many of the last steps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON, with every step."),
) -> None:
    """Show a run: its config, step metrics, evaluations, checkpoints and the model it published."""
    reg = Registry()
    run = reg.runs.get_run(run_id)
    all_steps = reg.runs.run_steps(run.id)
    evals = reg.runs.run_evals(run.id)
    checkpoints = reg.runs.run_checkpoints(run.id)
    if as_json:
        print_json(
            {
                **run.to_dict(),
                "steps": [s.to_dict() for s in all_steps],
                "evals": [e.to_dict() for e in evals],
                "checkpoints": [c.to_dict() for c in checkpoints],
            }
        )
        return
    info = Table(show_header=False, box=None)
    for key, value in [
        ("id", run.id),
        ("name", escape(run.name or "-")),
        ("status", _status(run)),
        ("strategy", escape(run.strategy)),
        ("world size", str(run.world_size)),
        ("created", _when(run.created_at)),
        ("started", _when(run.started_at)),
        ("ended", _when(run.ended_at)),
        ("duration", _duration(run)),
        ("steps", str(run.last_step) if run.last_step is not None else "-"),
        ("eval", _metrics(run.eval_metrics)),
        ("model", escape(run.model_uri or "-")),
        ("config hash", run.config_hash),
    ]:
        info.add_row(f"[bold]{key}[/]", value)
    if run.error:
        info.add_row("[bold red]error[/]", escape(run.error))
    console.print(info)
    console.print("\n[bold]config[/]")
    console.print(_yaml(run.config), markup=False, highlight=False)
    if all_steps and steps > 0:
        shown = all_steps[-steps:]
        console.print(f"\n[bold]steps[/] (last {len(shown)} of {len(all_steps)})")
        table = Table("step", "loss", "samples/s", "lr", "at")
        for s in shown:
            table.add_row(str(s.step), _num(s.loss), _num(s.samples_per_s), _num(s.lr), f"{s.at:%H:%M:%S}")
        console.print(table)
    if evals:
        names = list(dict.fromkeys(k for e in evals for k in e.metrics))
        console.print("\n[bold]evaluations[/]")
        table = Table("step", *map(escape, names), "at")
        for e in evals:
            table.add_row(str(e.step), *(_num(e.metrics.get(n)) for n in names), f"{e.at:%H:%M:%S}")
        console.print(table)
    if checkpoints:
        console.print("\n[bold]checkpoints[/]")
        table = Table("step", "path", "saved")
        for c in checkpoints:
            table.add_row(str(c.step), escape(c.path), f"{c.created_at:%Y-%m-%d %H:%M:%S}")
        console.print(table)
