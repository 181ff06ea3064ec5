"""``maas gc``: remove what interrupted registrations and loads left behind in MAAS_HOME."""

from __future__ import annotations

import typer
from rich.markup import escape

from maas.cli import backend
from maas.cli.output import console, print_json
from maas.registry import Debris, Registry


def age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def describe(d: Debris) -> str:
    """One line for a piece of debris, as ``maas models verify`` and ``maas gc`` print it."""
    return f"{d.kind:<10} {escape(d.path)}  {d.size:,} bytes, {age(d.age_s)} old"


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove unreferenced artifacts, temporary files of registrations that died, and stale cache extractions.

    Never removes an artifact a version uses, nor anything a running registration holds.
    """
    backend.local_only("maas gc", "it removes files from this machine's artifact store")
    result = Registry().gc(dry_run=dry_run)
    if as_json:
        print_json(result.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for d in result.removed:
        console.print(f"{verb}  {describe(d)}", highlight=False, soft_wrap=True)
    held = f"; {result.in_use} temporary item(s) left because a running process uses them" if result.in_use else ""
    if not result.removed:
        console.print(f"Nothing to remove{held}.")
        return
    console.print(f"{verb} {len(result.removed)} item(s), {result.bytes_freed:,} bytes{held}.")
