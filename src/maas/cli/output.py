"""Printing helpers shared by the CLI commands: Rich for people, ``--json`` for programs."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None  # JSON has no NaN or infinity: a diverged value is null
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """Write JSON to stdout with no Rich markup or wrapping, for piping into other tools (NaN as null)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def fail(message: str, code: int = 1) -> NoReturn:
    import typer

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
