"""``maas audit …``: list the audit log and check its hash chain."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from maas.cli.output import console, err_console, print_json

if TYPE_CHECKING:
    from maas.cli.backend import AuditLogView

app = typer.Typer(help="Who changed what: list the audit log and check that it is intact.", no_args_is_help=True)


def _log() -> AuditLogView:
    from maas.cli import backend

    return backend.audit_log()


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and len(value) == 1 and "version" in value:
        return str(value["version"])
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@app.command("list")
def list_entries(
    since: str | None = typer.Option(None, "--since", help="Only entries since then: 1h, 7d, or an ISO time (UTC)."),
    actor: str | None = typer.Option(None, "--actor", help="Only entries of this actor (key id or user)."),
    limit: int = typer.Option(100, "--limit", "-n", min=1, help="Show at most this many (the newest)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The newest audit entries, oldest first: when, who, what, on which target, and what changed."""
    from maas.access.times import parse_since

    entries = _log().list(since=parse_since(since) if since else None, actor=actor, limit=limit)
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        console.print("No audit entries match.")
        return
    table = Table("seq", "at (UTC)", "actor", "action", "target", "before", "after", "client")
    for e in entries:
        table.add_row(
            str(e.seq),
            f"{e.at:%Y-%m-%d %H:%M:%S}",
            escape(e.actor or "-"),
            e.action,
            escape(e.target),
            escape(_short(e.before)),
            escape(_short(e.after)),
            escape(e.client or "-"),
        )
    console.print(table)


@app.command("verify")
def verify(
    expect_head: str | None = typer.Option(
        None, "--expect-head", help="A head hash an earlier verify printed: fail if that entry is gone."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check the hash chain: exits 1 naming every edited, deleted or reordered entry.

    A chain cannot show that its newest entries were deleted: keep the head hash this prints somewhere safe and
    pass it back with --expect-head.
    """
    result = _log().verify(expect_head=expect_head)
    if as_json:
        print_json(result.to_dict())
    elif result.ok:
        console.print(
            f"audit log intact: {result.rows} entries, head seq {result.head_seq or 0} hash {result.head_hash}",
            highlight=False,
        )
        console.print(f"pin the head to detect later deletions: maas audit verify --expect-head {result.head_hash}")
    else:
        for p in result.problems:
            err_console.print(f"[bold red]FAIL[/] {escape(p.detail)}", highlight=False, soft_wrap=True)
        err_console.print(
            f"audit log NOT intact: {len(result.problems)} problem(s) in {result.rows} entries", highlight=False
        )
    if not result.ok:
        raise typer.Exit(1)
