"""``maas serve --engine ray``: deploy the replicas on Ray Serve, serve the front on the port, stop both on a signal."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maas import envs
from maas.errors import InvalidInput
from maas.serving.settings import ServerSettings
from maas.serving.workers import runtime_threads

if TYPE_CHECKING:
    from maas.serving.ray.metrics import SharedMetrics

log = logging.getLogger(__name__)

APP_NAME = "maas"
#: Settings that may hold credentials: given to the replicas as the deployment's arguments, not in its runtime_env
#: (which Ray writes to its logs, world-readable under /tmp/ray on a shared machine).
SECRET_SETTINGS = ("MAAS_DATABASE_URL", "MAAS_REDIS_URL")
#: Settings of the maas CLI as a client, which the replicas have no use for.
CLIENT_SETTINGS = ("MAAS_SERVER_URL", "MAAS_API_KEY", "MAAS_SSL_CA_FILE")
#: Ray Serve's per-request access log off (maas meters and counts requests itself); warnings and errors kept.
REPLICA_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


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


def replica_settings(settings: ServerSettings) -> dict[str, Any]:
    """What each replica serves with: no port of its own (the fronts forward REST and gRPC), one process each."""
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
    """Deploy maas on Ray Serve, serve the front once every replica runs, and block until SIGINT/SIGTERM; then stop
    the front, delete the app and, if Ray was started here, stop it. Returns the exit code."""
    if address:
        host, _ = cluster_address(address)
        if _is_loopback(host):
            # Ray dials a loopback address as this machine's network address (where a normal head listens); a cluster
            # started on loopback (``ray start --node-ip-address=127.0.0.1`` in Ray's single-node mode, as a local Ray
            # runs) listens only on 127.0.0.1: in the same mode, Ray dials the address as given.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    else:
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

    from maas.serving.ray.front import Front
    from maas.serving.ray.grpc_front import GrpcFront
    from maas.serving.ray.listener import Listener
    from maas.serving.ray.metrics import SharedMetrics
    from maas.serving.ray.replica import MaasReplica

    grpc_front = None if settings.grpc_port is None else GrpcFront(settings)  # its port checked free, as HTTP's
    listener = Listener(settings)  # the port, bound before Ray starts: a taken one fails at once
    shared = None if address else SharedMetrics()  # replicas on one machine: one /metrics for all
    # A local Ray keeps its sessions (logs, sockets) in a private folder, not in the shared /tmp/ray.
    scratch = None if address else Path(tempfile.mkdtemp(prefix="maas-ray-"))
    try:
        _start_ray(ray, replicas, autoscale, address, shared.env if shared else {}, scratch)
    except BaseException:
        listener.stop()
        _remove(shared, scratch)
        raise
    # After ray.init, which sets its own SIGTERM handlers (Python's exits at once, its C++ one then aborts the process,
    # leaving a local Ray's agents behind): a signal stops the front and the app as Ctrl-C does.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(
            name="MaasReplica",
            max_ongoing_requests=64,
            health_check_period_s=2,
            health_check_timeout_s=10,
            graceful_shutdown_timeout_s=10,
            **deployment_options(replicas, autoscale),
        )(serve.ingress()(MaasReplica))
        # A cluster whose node here is on loopback is this machine's alone: its replicas keep to loopback as local ones.
        loopback = not address or _is_loopback(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        secrets = {name: value for name, value in envs.given().items() if name in SECRET_SETTINGS}
        app = deployment.bind(replica_settings(settings), loopback, secrets)
        # No route prefix: Ray's proxies (those of an existing cluster's Serve) do not expose the app.
        handle = serve.run(app, name=APP_NAME, route_prefix=None, blocking=False, logging_config=REPLICA_LOGGING)
        if not stop.is_set():
            listener.start(Front(handle, listener.settings))
            if grpc_front is not None:
                grpc_front.start(handle)
            if on_ready is not None:
                on_ready()
        while not stop.wait(0.5):
            if not listener.alive() or (grpc_front is not None and not grpc_front.alive()):
                log.error("the front server stopped; shutting down")
                return 1
            if shared is not None:
                shared.reap()
    finally:
        if grpc_front is not None:
            grpc_front.stop()
        listener.stop()  # first: the answers in progress finish while their replicas still run
        try:
            if address:
                serve.delete(APP_NAME)  # the cluster and its Serve outlive us: remove only our app
            else:
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
            _remove(shared, scratch)
    return 0


def _remove(shared: SharedMetrics | None, scratch: Path | None) -> None:
    if shared is not None:
        shared.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _start_ray(
    ray: Any,
    replicas: int,
    autoscale: tuple[int, int] | None,
    address: str | None,
    env: dict[str, str],
    scratch: Path | None,
) -> None:
    """Join the cluster at ``address``, or start a local Ray sized for the replicas, keeping its sessions under
    ``scratch``; the ``MAAS_*`` settings given here (but secrets and client settings) and ``env`` reach the replicas
    through the ``runtime_env``."""
    given = {k: v for k, v in envs.given().items() if k not in SECRET_SETTINGS and k not in CLIENT_SETTINGS}
    env_vars = {**given, "RAY_USAGE_STATS_ENABLED": "0", **env}
    high = autoscale[1] if autoscale else replicas
    if not address:  # the replicas share this machine's CPUs, as --workers do (on a cluster Ray gives each its share)
        threads = str(envs.MAAS_RUNTIME_THREADS or runtime_threads(high))
        defaults = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name not in os.environ}
        env_vars = {**defaults, "MAAS_RUNTIME_THREADS": threads, **env_vars}
    runtime_env = {"env_vars": env_vars}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise InvalidInput(
                f"--ray-address {address}: Ray could not join the cluster there (its messages above say why). If they "
                "say 'Unauthenticated', the cluster uses Ray's token authentication: set RAY_AUTH_MODE=token here and "
                "give its token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
            ) from exc
    else:
        ray.init(
            _temp_dir=str(scratch),
            include_dashboard=False,
            num_cpus=max(os.cpu_count() or 1, high),
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )


def cluster_address(address: str) -> tuple[str, int]:
    """``--ray-address`` -> the (host, port) of the cluster's GCS, checked to answer: a wrong address fails at once
    (Ray itself retries for minutes). A Ray Client address (``ray://``) is refused: the front streams each answer
    through a deployment handle, which Ray Client does not support."""
    example = "e.g. --ray-address 10.0.0.5:6379 (the --port of `ray start --head`; 6379 by default)"
    if address.startswith("ray://"):
        raise InvalidInput(
            f"--ray-address {address}: a Ray Client address; maas streams answers through Ray Serve deployment "
            f"handles, which Ray Client does not support. Run `maas serve` on a node of the cluster and give the "
            f"cluster's GCS address HOST:PORT, {example}"
        )
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"--ray-address {address!r}: expected the GCS address HOST:PORT of a Ray cluster, {example}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise InvalidInput(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with `ray start --head` or give "
            f"the GCS address of a running one, {example}"
        ) from None
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
