"""``maas serve``: the inference server on the embedded default (or MAAS_DATABASE_URL)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer

from maas import envs

if TYPE_CHECKING:
    from maas.serving.settings import ServerSettings


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
    ssl_certfile: str = typer.Option(
        None, "--ssl-certfile", help="PEM certificate chain: serve REST and gRPC over TLS (MAAS_SSL_CERTFILE)."
    ),
    ssl_keyfile: str = typer.Option(
        None, "--ssl-keyfile", help="PEM private key of --ssl-certfile, unencrypted (MAAS_SSL_KEYFILE)."
    ),
    auth: str = typer.Option(
        None, "--auth", help="API keys: auto (required off loopback), required or disabled (MAAS_AUTH)."
    ),
    allow_unauthenticated: bool = typer.Option(
        False,
        "--allow-unauthenticated",
        help="Serve a non-loopback address with --auth disabled: a proxy in front does the auth.",
    ),
    engine: str = typer.Option(
        "uvicorn",
        "--engine",
        help="uvicorn (this machine's processes) or ray (replicas on Ray Serve; needs maas[ray]).",
    ),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray Serve replicas (--engine ray)."),
    autoscale: str = typer.Option(
        None, "--autoscale", help="MIN:MAX replicas, scaled by Ray Serve on requests in flight (--engine ray)."
    ),
    ray_address: str = typer.Option(
        None,
        "--ray-address",
        help=(
            "An existing Ray cluster's GCS address HOST:PORT, from one of its nodes (not ray://); default: a local Ray."
        ),
    ),
) -> None:
    """Serve registered models over the Open Inference Protocol v2 (REST); Ctrl-C stops."""
    from maas.cli.output import console
    from maas.serving.settings import ServerSettings

    level = (log_level or str(envs.MAAS_LOG_LEVEL or "info")).lower()
    logging.getLogger("maas").setLevel(level.upper())
    settings = ServerSettings.from_env(
        host=host,
        port=port,
        grpc_port=grpc_port,
        workers=workers,
        models=model or None,
        device=device,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        auth=auth.strip().lower() if auth else None,
        allow_unauthenticated=allow_unauthenticated or None,
    )
    engine = engine.strip().lower()
    if engine not in ("uvicorn", "ray"):
        raise typer.BadParameter(f"{engine!r}: expected uvicorn or ray", param_hint="--engine")
    if engine != "ray" and (replicas > 1 or autoscale or ray_address):
        raise typer.BadParameter("--replicas, --autoscale and --ray-address need --engine ray", param_hint="--engine")
    if engine == "ray" and settings.workers > 1:
        raise typer.BadParameter("with --engine ray, use --replicas N instead of --workers N", param_hint="--workers")
    if no_grpc:
        settings = settings.model_copy(update={"grpc_port": None})
    tls = settings.tls() is not None  # checked before anything binds: a bad pair is an error here, not in a worker
    keys = _access(settings, tls)
    processes = settings.workers

    def where(s: ServerSettings) -> str:
        scheme = "s" if tls else ""
        grpc = f" and [bold]grpc{scheme}://{s.host}:{s.grpc_port}[/]" if s.grpc_port is not None else ""
        return f"[bold]http{scheme}://{s.host}:{s.port}[/]{grpc}{', API keys required' if keys else ''}"

    if engine == "ray":
        from maas.serving.ray import parse_autoscale, serve_on_ray

        scale = parse_autoscale(autoscale) if autoscale else None
        count = f"{scale[0]} to {scale[1]}" if scale else str(replicas)

        def announce_ray() -> None:
            console.print(
                f"maas serving on {where(settings)} with {count} Ray Serve replicas (registry: {envs.MAAS_HOME})"
            )

        raise typer.Exit(
            serve_on_ray(settings, replicas=replicas, autoscale=scale, address=ray_address, on_ready=announce_ray)
        )

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


def _access(settings: ServerSettings, tls: bool) -> bool:
    """Whether the server will require keys; refuses a non-loopback bind without auth unless allowed, and records the
    access settings in the audit log when they changed at this address."""
    from maas.access.keys import database_of
    from maas.access.server_settings import record_server_settings
    from maas.registry import Registry
    from maas.serving.access.mode import auth_required

    required = auth_required(settings.auth, settings.host, allow_unauthenticated=settings.allow_unauthenticated)
    values = {
        "auth": settings.auth,
        "keys_required": required,
        "allow_unauthenticated": settings.allow_unauthenticated,
        "tls": tls,
        "grpc": settings.grpc_port is not None,
    }
    try:
        record_server_settings(database_of(Registry()), f"{settings.host}:{settings.port}", values)
    except Exception as exc:  # the registry cannot be opened: the server says so as it starts, in its own words
        logging.getLogger("maas.serve").warning("the access settings were not recorded in the audit log: %s", exc)
    return required
