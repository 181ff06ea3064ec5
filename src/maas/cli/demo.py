"""``maas demo``: the main job on the embedded default."""

from __future__ import annotations

import typer


def demo(
    smoke: bool = typer.Option(False, "--smoke", help="Exit after the self-check instead of serving."),
    port: int = typer.Option(8000, "--port", "-p", help="Port for the server (a free one if taken)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
) -> None:
    """Train a digits classifier, register it as `digits@production`, serve it and classify through the server."""
    from maas.cli.output import console
    from maas.demo.run import run_demo

    accuracy = run_demo(smoke=smoke, host=host, port=port, console=console)
    if smoke and accuracy < 0.9:
        raise typer.Exit(1)
