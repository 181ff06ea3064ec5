"""``maas models …``: register, list, show, alias, roll back, delete and verify model versions, in the local
registry or, with MAAS_SERVER_URL set, on that server (see :mod:`maas.cli.backend`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from maas.cli import backend
from maas.cli.output import console, fail, print_json
from maas.registry import DEFAULT_ALIAS, ModelVersion, parse_ref

app = typer.Typer(help="Register and manage model versions.", no_args_is_help=True)
alias_app = typer.Typer(help="Set, delete and list aliases (production, staging, …).", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            fail(f"--{what} {v!r} is not KEY=VALUE; write e.g. --{what} team=vision")
        out[key] = val
    return out


def _model(ref: str) -> str:
    """A model name from NAME or models:/NAME (a version or alias here would be ambiguous)."""
    r = parse_ref(ref)
    if r.version is not None or r.alias is not None:
        fail(f"{ref!r} names a version; this command takes a model: write {r.name!r}")
    return r.name


def _sig(mv: ModelVersion) -> str:
    ins = ", ".join(s.describe() for s in mv.signature.inputs)
    outs = ", ".join(s.describe() for s in mv.signature.outputs)
    return f"({ins}) -> ({outs})"


@app.command("register")
def register(
    path: Path = typer.Argument(..., help="The model file (.onnx, .pt2 or .gguf) or a Hugging Face model directory."),
    name: str = typer.Option(..., "--name", "-n", help="Model name: letters, digits, '-', '_', '.'."),
    alias: str | None = typer.Option(None, "--alias", "-a", help="Point this alias at the new version."),
    description: str = typer.Option("", "--description", "-d"),
    tag: list[str] = typer.Option([], "--tag", "-t", help="KEY=VALUE, repeatable."),
    metric: list[str] = typer.Option([], "--metric", "-m", help="KEY=NUMBER, repeatable."),
    format: str | None = typer.Option(
        None, "--format", "-f", help="onnx, torch_export or hf_transformers; detected if omitted."
    ),
    parent: str | None = typer.Option(None, "--parent", help="URI of the version this one derives from."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Register a model file (or a Hugging Face model directory) as the next version of NAME."""
    metrics: dict[str, float] = {}
    for k, v in _pairs(metric, "metric").items():
        try:
            metrics[k] = float(v)
        except ValueError:
            fail(f"--metric {k}={v}: the value must be a number")
    mv = backend.registry().register(
        path,
        name,
        format=format,
        description=description,
        tags=_pairs(tag, "tag"),
        metrics=metrics,
        alias=alias,
        parent=parent,
    )
    if as_json:
        print_json(mv.to_dict())
        return
    extra = f" and moved alias [bold]{alias}[/]" if alias else ""
    console.print(f"Registered [bold]{mv.uri}[/] ({mv.format}, {mv.artifact_size:,} bytes){extra}")
    console.print(f"  signature {_sig(mv)}")
    console.print(f"  digest    {mv.artifact_digest}")


@app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List registered models with their latest version and aliases."""
    models = backend.registry().list_models()
    if as_json:
        print_json([m.to_dict() for m in models])
        return
    if not models:
        console.print("No models registered yet. Try `maas models register model.onnx --name NAME`.")
        return
    table = Table("name", "versions", "latest", "aliases", "updated")
    for m in models:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
        table.add_row(
            m.name, str(m.version_count), str(m.latest_version or "-"), aliases, f"{m.updated_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME (all versions), NAME/VERSION, NAME@ALIAS or a models:/ URI."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model with all its versions, or one version in detail."""
    reg = backend.registry()
    r = parse_ref(ref)
    if r.version is None and r.alias is None:
        model = reg.get_model(r.name)
        versions = reg.list_versions(r.name)
        if as_json:
            print_json({**model.to_dict(), "versions": [v.to_dict() for v in versions]})
            return
        console.print(f"[bold]{model.name}[/]  {escape(model.description)}")
        table = Table("version", "format", "aliases", "metrics", "size", "created", "signature")
        for v in versions:
            metrics = ", ".join(f"{k}={val:.4g}" for k, val in v.metrics.items())
            table.add_row(
                str(v.version),
                v.format,
                ", ".join(v.aliases),
                metrics,
                f"{v.artifact_size:,}",
                f"{v.created_at:%Y-%m-%d %H:%M}",
                _sig(v),
            )
        console.print(table)
        return
    mv = reg.resolve(r)
    if as_json:
        print_json(mv.to_dict())
        return
    table = Table(show_header=False, box=None)
    for key, value in [
        ("uri", mv.uri),
        ("format", mv.format),
        ("aliases", ", ".join(mv.aliases) or "-"),
        ("description", mv.description or "-"),
        ("signature", _sig(mv)),
        ("metrics", ", ".join(f"{k}={v:.6g}" for k, v in mv.metrics.items()) or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in mv.tags.items()) or "-"),
        ("parent", mv.lineage.parent or "-"),
        ("source run", mv.lineage.source_run or "-"),
        ("creator", mv.lineage.creator or "-"),
        *[(k.replace("_", " "), escape(str(v))) for k, v in mv.lineage.extra.items() if not isinstance(v, dict)],
        ("created", mv.created_at.isoformat()),
        ("artifact", f"{mv.artifact_digest} ({mv.artifact_size:,} bytes)"),
    ]:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


@alias_app.command("set")
def alias_set(name: str, alias: str, version: int) -> None:
    """Point ALIAS of NAME at VERSION (recorded in the alias history)."""
    name = _model(name)
    ev = backend.registry().set_alias(name, alias, version)
    was = f" (was {ev.from_version})" if ev.from_version is not None else ""
    console.print(f"{name}@{alias} → {ev.to_version}{was}")


@alias_app.command("delete")
def alias_delete(name: str, alias: str) -> None:
    """Remove ALIAS from NAME (recorded in the alias history)."""
    name = _model(name)
    ev = backend.registry().delete_alias(name, alias)
    console.print(f"deleted {name}@{alias} (was {ev.from_version})")


@alias_app.command("history")
def alias_history(
    name: str,
    alias: str | None = typer.Option(None, "--alias", "-a", help="Only this alias."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every alias move of NAME: when, from which version, to which, by whom."""
    events = backend.registry().alias_history(_model(name), alias)
    if as_json:
        print_json([e.to_dict() for e in events])
        return
    table = Table("when", "alias", "action", "from", "to", "by")
    for e in events:
        table.add_row(
            f"{e.at:%Y-%m-%d %H:%M:%S}",
            e.alias,
            e.action,
            str(e.from_version or "-"),
            str(e.to_version or "-"),
            e.actor or "-",
        )
    console.print(table)


@app.command("rollback")
def rollback(
    name: str,
    alias: str = typer.Option(DEFAULT_ALIAS, "--alias", "-a", help="The alias to move back."),
) -> None:
    """Point an alias back at the version it held before its last move."""
    name = _model(name)
    ev = backend.registry().rollback(name, alias)
    console.print(f"rolled back {name}@{alias}: {ev.from_version} → {ev.to_version}")


@app.command("delete")
def delete(
    ref: str = typer.Argument(..., help="NAME/VERSION (or models:/NAME/VERSION)."),
    force: bool = typer.Option(False, "--force", help="Also delete aliases that point at the version."),
) -> None:
    """Delete one version; refused while an alias points at it unless --force."""
    r = parse_ref(ref)
    if r.version is None:
        fail(f"{ref!r} names no version; write NAME/VERSION, e.g. `maas models delete {r.name}/1`")
    mv = backend.registry().delete_version(r.name, r.version, force=force)
    console.print(f"deleted {mv.uri}")


@app.command("verify")
def verify(
    name: str | None = typer.Argument(None, help="Only this model (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-check every artifact's sha256, and list debris (files nothing uses; `maas gc` removes them).

    Exits 1 if any artifact is missing or corrupted; debris alone costs only disk space and exits 0.
    """
    from maas.cli.gc import describe
    from maas.registry import Registry

    backend.local_only("maas models verify", "it reads the artifact files themselves")
    report = Registry().verify(_model(name) if name else None)
    bad = [r for r in report.versions if not r.ok]
    if as_json:
        print_json(report.to_dict())
    else:
        for r in report.versions:
            if r.ok:
                console.print(f"[green]ok[/]   {r.name}/{r.version}  {r.expected}")
            else:
                console.print(f"[red]FAIL[/] {r.name}/{r.version}  {escape(r.message)}", soft_wrap=True)
        console.print(f"{len(report.versions) - len(bad)} ok, {len(bad)} failed")
        if report.debris:
            console.print(
                f"[yellow]debris[/]: {len(report.debris)} item(s), {report.debris_bytes:,} bytes that no version "
                "and no running registration uses; run `maas gc` to remove them:"
            )
            for d in report.debris:
                console.print(f"  {describe(d)}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)
