"""The ``maas`` command. Each command group lives in its own module; this one only assembles them.

Nothing here imports torch, onnx or onnxruntime: commands import what they need when they run.
"""

from __future__ import annotations

import logging
import sys

import typer

from maas import __version__, envs
from maas.cli import (
    audit,
    chat,
    compress,
    demo,
    deploy,
    deploy_manifest,
    gc,
    keys,
    model_report,
    models,
    runs,
    serve,
    train,
    usage,
)
from maas.errors import MaasError

app = typer.Typer(
    name="maas",
    help="Model-as-a-Service: train, compress, register, version and serve models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models.app.command("report")(model_report.report)
app.add_typer(models.app, name="models")
app.add_typer(runs.app, name="runs")
app.add_typer(deploy.app, name="deployments")
app.add_typer(audit.app, name="audit")
app.add_typer(keys.app, name="keys")
app.command("deploy")(deploy.deploy)
app.command("deploy-manifest")(deploy_manifest.deploy_manifest)
app.command("serve")(serve.serve)
app.command("chat")(chat.chat)
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.command("compress")(compress.compress)
app.command("gc")(gc.gc)
app.command("usage")(usage.usage)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"maas {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("maas").setLevel(str(envs.MAAS_LOG_LEVEL or "WARNING").upper())


def run() -> None:
    """Console-script entry point: turns maas errors into a one-line message and exit code 1."""
    from rich.markup import escape

    from maas.cli.output import err_console

    try:
        app()
    except MaasError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
