"""``maas usage``: what each API key did with each model version, from the usage the servers metered."""

from __future__ import annotations

import csv
import sys
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from maas.cli.output import console, print_json

if TYPE_CHECKING:
    from maas.access.usage import UsageTotal

_PERIOD_FORMAT = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


def usage(
    key: str | None = typer.Option(None, "--key", help="Only this key id (`-`: requests made with auth off)."),
    model: str | None = typer.Option(None, "--model", help="Only this model."),
    since: str | None = typer.Option(None, "--since", help="From then on: 1h, 7d, 2w, or an ISO time (UTC)."),
    until: str | None = typer.Option(None, "--until", help="Up to then (same forms as --since); default: now."),
    by: str = typer.Option("day", "--by", help="Group by minute, hour, day, or total (the whole span)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
) -> None:
    """Requests, errors, rows or items, tokens and compute seconds per key, model and version (UTC periods)."""
    from maas.access.times import parse_since
    from maas.cli import backend

    totals = backend.usage().query(
        key_id=key,
        model=model,
        since=parse_since(since) if since else None,
        until=parse_since(until) if until else None,
        by=by,
    )
    if as_json:
        print_json([t.to_dict() for t in totals])
    elif as_csv:
        _csv(totals)
    elif not totals:
        console.print("No usage recorded for this selection.")
    else:
        _table(totals, by)


def _csv(totals: list[UsageTotal]) -> None:
    columns = ["period", "key_id", "model", "version", "requests", "errors", "items"]
    columns += ["prompt_tokens", "completion_tokens", "tokens", "compute_s"]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for t in totals:
        writer.writerow(t.to_dict())


def _table(totals: list[UsageTotal], by: str) -> None:
    table = Table(f"{by} (UTC)", "key", "model")
    for column in ("version", "requests", "errors", "items", "prompt tokens", "completion tokens", "compute s"):
        table.add_column(column, justify="right")
    for t in totals:
        table.add_row(
            f"{t.period:{_PERIOD_FORMAT[by]}}" if t.period else "all",
            escape(t.key_id),
            escape(t.model),
            str(t.version or "-"),
            f"{t.requests:,}",
            f"{t.errors:,}",
            f"{t.items:,}",
            f"{t.prompt_tokens:,}",
            f"{t.completion_tokens:,}",
            f"{t.compute_s:,.3f}",
        )
    if len(totals) > 1:
        table.add_section()
        table.add_row(
            "total",
            "",
            "",
            "",
            f"{sum(t.requests for t in totals):,}",
            f"{sum(t.errors for t in totals):,}",
            f"{sum(t.items for t in totals):,}",
            f"{sum(t.prompt_tokens for t in totals):,}",
            f"{sum(t.completion_tokens for t in totals):,}",
            f"{sum(t.compute_s for t in totals):,.3f}",
        )
    console.print(table)
