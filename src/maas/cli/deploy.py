"""``maas deploy`` and ``maas deployments …``: set and read how servers serve each model, in the local registry or,
with MAAS_SERVER_URL set, on that server (see :mod:`maas.cli.backend`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from maas.cli import backend
from maas.cli.output import console, fail, print_json
from maas.registry import Deployment, parse_ref
from maas.registry.deployments import SETTINGS, changed_settings, defaults, merge_deployment, read_deployments

app = typer.Typer(help="Read model deployments: batching, queueing, instances, threads.", no_args_is_help=True)

_TITLES = {
    "max_batch_size": "max batch",
    "max_queue_delay_ms": "delay ms",
    "preferred_batch_sizes": "preferred",
    "max_queue_size": "queue",
    "instances": "instances",
    "threads": "threads",
}


def _model(ref: str) -> str:
    r = parse_ref(ref)
    if r.version is not None or r.alias is not None:
        fail(f"{ref!r} names a version; a deployment belongs to a model: write {r.name!r}")
    return r.name


def _show(setting: str, value: Any) -> str:
    if setting == "preferred_batch_sizes":
        return ",".join(map(str, value)) or "-"
    if setting == "threads" and value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sizes(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--preferred-batch-sizes {text!r} is not a list of integers; write e.g. --preferred-batch-sizes 8,16,32")


def _threads(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    try:
        return int(text)
    except ValueError:
        fail(f"--threads {text!r} is not an integer; give 1 to 256, or 'default' for the server's own")


def _print(before: Deployment, after: Deployment) -> None:
    changed = changed_settings(before, after)
    name = escape(after.name)
    if not changed and before.revision == after.revision:
        console.print(f"No change: [bold]{name}[/] already has these settings (revision {after.revision}).")
    else:
        what = ", ".join(f"{s} {_show(s, getattr(before, s))} → {_show(s, getattr(after, s))}" for s in changed)
        console.print(f"Deployed [bold]{name}[/] (revision {after.revision}): {escape(what) or 'the defaults'}")
        console.print("Running servers follow within about 2 s.")
    _table(after, changed)


def _table(d: Deployment, changed: list[str]) -> None:
    table = Table("setting", "value", "default", show_header=True, box=None)
    fallback = defaults()
    for s in SETTINGS:
        mark = " [yellow](changed)[/]" if s in changed else ""
        table.add_row(s, escape(_show(s, getattr(d, s))) + mark, escape(_show(s, fallback[s])))
    console.print(table)


def deploy(
    name: str | None = typer.Argument(None, help="The model to deploy (omit with --file)."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="YAML: one mapping {name: …, max_batch_size: …} or deployments: [{…}, …]."
    ),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", help="Most rows in one batch, 1..4096; 1 turns dynamic batching off."
    ),
    max_queue_delay_ms: float | None = typer.Option(
        None, "--max-queue-delay-ms", help="How long a request may wait for others to batch with, 0..10000 ms."
    ),
    preferred_batch_sizes: str | None = typer.Option(
        None, "--preferred-batch-sizes", help="Batch sizes worth waiting for, e.g. 8,16,32; 'none' for none."
    ),
    max_queue_size: int | None = typer.Option(
        None, "--max-queue-size", help="Requests waiting per loaded version, 1..1000000; more get 429."
    ),
    instances: int | None = typer.Option(None, "--instances", help="Batches of the model run at once, 1..64."),
    threads: str | None = typer.Option(
        None, "--threads", help="Compute threads per instance, 1..256, or 'default' (the server's)."
    ),
    reset: bool = typer.Option(False, "--reset", help="Start from the defaults, not from the current deployment."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with --file: a list)."),
) -> None:
    """Set how servers serve a model: dynamic batching, queueing, instances, threads.

    Settings not given keep their current values (with --reset: the defaults). Running servers follow within
    about 2 s.
    """
    given: dict[str, Any] = {
        key: value
        for key, value in {
            "max_batch_size": max_batch_size,
            "max_queue_delay_ms": max_queue_delay_ms,
            "preferred_batch_sizes": None if preferred_batch_sizes is None else _sizes(preferred_batch_sizes),
            "max_queue_size": max_queue_size,
            "instances": instances,
        }.items()
        if value is not None
    }
    if threads is not None:
        given["threads"] = _threads(threads)
    if file is not None and name is not None:
        fail(f"give a model NAME or --file, not both: the file names its models ({name!r} given too)")
    if file is None and name is None:
        fail("give a model NAME with settings, or --file FILE.yaml; e.g. maas deploy digits --max-batch-size 32")
    if file is not None and given:
        fail("give the settings in the file or as options, not both")
    if file is None and not given and not reset:
        fail(f"no settings given for {name}; e.g. maas deploy {name} --max-batch-size 32 (--reset: the defaults)")
    plan = read_deployments(file) if file is not None else [(_model(name or ""), given)]
    reg = backend.registry()
    # Every model and every merged deployment checked before the first change: a bad file changes nothing.
    befores = [reg.get_deployment(n) for n, _ in plan]
    for before, (n, changes) in zip(befores, plan, strict=True):
        merge_deployment(Deployment(n) if reset else before, changes)
    afters = [reg.deploy(n, reset=reset, **changes) for n, changes in plan]
    if as_json:
        out = [{**a.to_dict(), "changed": changed_settings(b, a)} for b, a in zip(befores, afters, strict=True)]
        print_json(out if file is not None else out[0])
        return
    for before, after in zip(befores, afters, strict=True):
        _print(before, after)


@app.command("list")
def list_deployments(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the stored deployments; a model not listed runs with the defaults."""
    deployments = backend.registry().list_deployments()
    if as_json:
        print_json([d.to_dict() for d in deployments])
        return
    if not deployments:
        console.print("No deployments: every model runs with the defaults (set one with `maas deploy NAME …`).")
        return
    table = Table("model", *_TITLES.values(), "revision", "updated")
    for d in deployments:
        updated = f"{d.updated_at:%Y-%m-%d %H:%M:%S}" if d.updated_at else "-"
        table.add_row(escape(d.name), *(escape(_show(s, getattr(d, s))) for s in SETTINGS), str(d.revision), updated)
    console.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="The model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model's deployment (the defaults, revision 0, when it has none)."""
    d = backend.registry().get_deployment(_model(name))
    if as_json:
        print_json(d.to_dict())
        return
    if d.revision == 0 or d.updated_at is None:
        console.print(f"[bold]{escape(d.name)}[/]: not deployed, runs with the defaults (revision 0)")
    else:
        console.print(f"[bold]{escape(d.name)}[/]: revision {d.revision}, updated {d.updated_at:%Y-%m-%d %H:%M:%S}")
    _table(d, [])


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove a model's deployment: servers go back to the defaults for it within about 2 s."""
    model = _model(name)
    deleted = backend.registry().undeploy(model)
    if as_json:
        print_json({"name": model, "deleted": deleted})
    elif deleted:
        console.print(f"Deleted the deployment of [bold]{escape(model)}[/]: it runs with the defaults now.")
    else:
        console.print(f"[bold]{escape(model)}[/] had no deployment: it already runs with the defaults.")
