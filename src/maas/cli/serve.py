"""``maas serve``: the inference server on the embedded default (or MAAS_DATABASE_URL)."""

from __future__ import annotations

import logging

import typer

from maas import envs


def serve(
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; MAAS_HOST)."),
    port: int = typer.Option(None, "--port", "-p", help="Port (default 8000; MAAS_PORT)."),
    grpc_port: int = typer.Option(None, "--grpc-port", help="gRPC port (default 8001; MAAS_GRPC_PORT)."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve no gRPC endpoint."),
    model: list[str] = typer.Option([], "--model", "-m", help="Serve only this model; repeatable. Default: all."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or auto (MAAS_DEVICE)."),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning, error (MAAS_LOG_LEVEL)."),
    workers: int = typer.Option(
        None, "--workers", "-w", min=1, help="Server processes on the same ports (default 1; MAAS_WORKERS)."
    ),
) -> None:
    """Serve registered models over the Open Inference Protocol v2 (REST); Ctrl-C stops."""
    from maas.cli.output import console
    from maas.serving.settings import ServerSettings

    level = (log_level or str(envs.MAAS_LOG_LEVEL or "info")).lower()
    logging.getLogger("maas").setLevel(level.upper())
    settings = ServerSettings.from_env(
        host=host, port=port, grpc_port=grpc_port, workers=workers, models=model or None, device=device
    )
    if no_grpc:
        settings = settings.model_copy(update={"grpc_port": None})
    processes = settings.workers

    def where(s: ServerSettings) -> str:
        grpc = f" and [bold]grpc://{s.host}:{s.grpc_port}[/]" if s.grpc_port is not None else ""
        return f"[bold]http://{s.host}:{s.port}[/]{grpc}"

    if processes > 1:
        from maas.serving.workers import Supervisor

        def announce(s: ServerSettings) -> None:
            console.print(f"maas serving on {where(s)} with {processes} workers (registry: {envs.MAAS_HOME})")

        raise typer.Exit(Supervisor(settings, processes, log_level=level, on_ready=announce).run())

    import uvicorn

    from maas.serving.app import create_app
    from maas.serving.worker import server_options

    app = create_app(settings)
    console.print(f"maas serving on {where(settings)} (registry: {envs.MAAS_HOME})")
    uvicorn.run(app, host=settings.host, port=settings.port, **server_options(settings, level))
