"""``maas serve --engine ray``: the maas app as a Ray Serve deployment of N replicas behind Ray's HTTP proxy.

Each replica builds its own app with :func:`create_app` (its own model manager, batchers and metrics) and opens the
shared registry named by the ``MAAS_*`` settings, which reach it through Ray's ``runtime_env``. A local Ray is started
on 127.0.0.1 unless an address is given. Ray has no authentication of its own: keep its ports on loopback or a private
network. Ray is imported only here, and only when this engine is chosen.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas import envs
from maas.errors import InvalidInput
from maas.serving.settings import ServerSettings
from maas.serving.workers import runtime_threads

log = logging.getLogger(__name__)

APP_NAME = "maas"
#: Ray Serve's per-request access log off (maas meters and counts requests itself); warnings and errors kept.
REPLICA_LOGGING = {"log_level": "WARNING", "enable_access_log": False}
#: Response header naming the replica that answered (Ray's replica id, not a pid or host name).
REPLICA_HEADER = "x-maas-replica"


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` -> (min, max) replicas, 0 <= min <= max, max >= 1."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        low = high = -1
    if not sep or low < 0 or high < max(low, 1):
        raise InvalidInput(
            f"--autoscale {text!r}: expected MIN:MAX replicas with 0 <= MIN <= MAX, e.g. --autoscale 1:4"
        )
    return low, high


class ReplicaTagged:
    """The replica's app, with :data:`REPLICA_HEADER` on every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica.encode())

    def add_exception_handler(self, *args: Any) -> None:
        # Ray Serve installs its back-pressure handlers here; they belong to the wrapped FastAPI app.
        self.app.add_exception_handler(*args)  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, tagged)


class MaasReplica:
    """One Ray Serve replica: a whole maas app, built in the replica's own process (Ray calls
    ``__serve_build_asgi_app__`` there, then runs the app's lifespan, which starts the model manager)."""

    def __init__(self, settings: dict[str, Any], loopback: bool) -> None:
        self._settings = ServerSettings.model_validate(settings)
        if loopback:
            _inter_deployment_grpc_on_loopback()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from ray import serve

        from maas.serving.app import create_app

        logging.getLogger("maas").setLevel(str(envs.MAAS_LOG_LEVEL or "info").upper())
        replica = serve.get_replica_context().replica_id.unique_id
        return ReplicaTagged(create_app(self._settings), replica)


def _inter_deployment_grpc_on_loopback() -> None:
    """Ray Serve 2.60's replica opens a gRPC server for calls between deployments on ``[::]:0`` (hard-coded, after
    the app is built): on a local Ray, bind it to loopback like every other Ray port. maas makes no such calls."""
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "maas_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> Any:
        return add_port(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.maas_loopback = True  # type: ignore[attr-defined]
    setattr(replica, "add_port_to_grpc_server", on_loopback)  # noqa: B010 (a private name mypy cannot see)


def replica_settings(settings: ServerSettings) -> dict[str, Any]:
    """What each replica serves with: HTTP only (Ray's proxy holds the port; no gRPC), one process per replica."""
    return settings.model_copy(update={"grpc_port": None, "workers": 1}).model_dump(mode="json")


def deployment_options(replicas: int, autoscale: tuple[int, int] | None) -> dict[str, Any]:
    if autoscale is None:
        return {"num_replicas": replicas}
    low, high = autoscale
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": min(max(replicas, low), high),
            "target_ongoing_requests": 4,
        }
    }


def serve_on_ray(
    settings: ServerSettings,
    *,
    replicas: int,
    autoscale: tuple[int, int] | None = None,
    address: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Deploy maas on Ray Serve and block until SIGINT/SIGTERM; then delete the app and, if Ray was started here,
    stop it. Returns the exit code."""
    if not address:
        # A local Ray is one node on loopback: Ray's "not a cluster" mode (its default on macOS and Windows) gives every
        # Ray process 127.0.0.1 as the node address, so its gRPC servers bind there and nowhere else. Read by Ray at
        # import and by the processes it starts, hence set in this process's environment first.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InvalidInput(
            "--engine ray needs Ray Serve, which is not installed: pip install 'maas[ray]' (or 'ray[serve]>=2.40')"
        ) from None

    env_vars = {**envs.given(), "RAY_USAGE_STATS_ENABLED": "0"}
    if not address:  # the replicas share this machine's CPUs, as --workers do (on a cluster Ray gives each its share)
        threads = str(envs.MAAS_RUNTIME_THREADS or runtime_threads(autoscale[1] if autoscale else replicas))
        defaults = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name not in os.environ}
        env_vars = {**defaults, "MAAS_RUNTIME_THREADS": threads, **env_vars}
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        high = autoscale[1] if autoscale else replicas
        ray.init(
            include_dashboard=False,
            num_cpus=max(os.cpu_count() or 1, high),
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )
    http: dict[str, Any] = {"host": settings.host, "port": settings.port}
    if settings.ssl_certfile:
        http |= {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options=http, logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(
            name="MaasReplica",
            max_ongoing_requests=64,
            health_check_period_s=2,
            health_check_timeout_s=10,
            graceful_shutdown_timeout_s=10,
            **deployment_options(replicas, autoscale),
        )(serve.ingress()(MaasReplica))
        app = deployment.bind(replica_settings(settings), not address)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=REPLICA_LOGGING)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        try:
            if address:
                serve.delete(APP_NAME)  # the cluster and its Serve outlive us: remove only our app
            else:
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
    return 0
