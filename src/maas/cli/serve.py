"""``maas serve``: the inference server on the embedded default (or MAAS_DATABASE_URL)."""

from __future__ import annotations

import logging

import typer

from maas import envs


def serve(
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; MAAS_HOST)."),
    port: int = typer.Option(None, "--port", "-p", help="Port (default 8000; MAAS_PORT)."),
    model: list[str] = typer.Option([], "--model", "-m", help="Serve only this model; repeatable. Default: all."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or auto (MAAS_DEVICE)."),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning, error (MAAS_LOG_LEVEL)."),
) -> None:
    """Serve registered models over the Open Inference Protocol v2 (REST); Ctrl-C stops."""
    import uvicorn

    from maas.cli.output import console
    from maas.serving.app import create_app
    from maas.serving.connections import uvicorn_options
    from maas.serving.settings import ServerSettings

    level = (log_level or str(envs.MAAS_LOG_LEVEL or "info")).lower()
    logging.getLogger("maas").setLevel(level.upper())
    settings = ServerSettings.from_env(host=host, port=port, models=model or None, device=device)
    app = create_app(settings)
    console.print(f"maas serving on [bold]http://{settings.host}:{settings.port}[/] (registry: {envs.MAAS_HOME})")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level,
        access_log=False,
        timeout_graceful_shutdown=5,
        **uvicorn_options(settings),
    )
