"""``maas serve --engine ray --ray-address HOST:PORT``: joining a Ray cluster started beforehand with ``ray start``, as
a user runs one (a single node on loopback, Ray's token authentication on). The replicas run on the cluster, both
answer, every port is on loopback; Ctrl-C or SIGTERM deletes only the ``maas`` application, leaving the cluster and
its Serve running, and a second ``maas serve`` deploys again there. A Ray Client address (``ray://``), which cannot
carry the front's streams, and an address where no cluster answers are refused before Ray starts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from maas.registry import Registry
from maas.testing import processes
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, free_port
from tests.ray_helpers import LOOPBACK, answering, listening

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray Serve not installed: pip install 'maas[ray]'"
)

#: A driver of its own that lists the cluster's Serve applications.
APPLICATIONS = (
    "import json, sys, ray\n"
    "from ray import serve\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "print(json.dumps(sorted(serve.status().applications)))\n"
)


@dataclass
class Cluster:
    """A ``ray start --head --block`` in its own session: every Ray process it starts (workers too) is in it."""

    proc: subprocess.Popen[bytes]
    address: str
    #: What a driver joining it needs: Ray's token authentication, with this cluster's token.
    auth: dict[str, str]
    log: Path

    def members(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    def running(self, prefix: str) -> list[psutil.Process]:
        found = []
        for p in self.members():
            with contextlib.suppress(psutil.Error):
                if " ".join(p.cmdline()).startswith(prefix):
                    found.append(p)
        return found

    def applications(self) -> list[str]:
        """The Serve applications on the cluster, as a new driver joining it sees them."""
        env = {**os.environ, **self.auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        proc = processes.run([sys.executable, "-c", APPLICATIONS, self.address], env=env, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        names: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
        return names


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One node on loopback: Ray's single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as maas runs a local Ray)
    is what makes ``--node-ip-address=127.0.0.1`` hold (otherwise Ray replaces it by the network address and binds
    every interface). Its own temporary folder and free ports for the ports Ray otherwise fixes, so that it meets no
    other Ray on this machine; stopped by SIGTERM to its ``ray start --block``, which stops only what it started."""
    temp = Path(tempfile.mkdtemp(prefix="maas-ray-"))  # short: Ray's socket paths under it must fit in 107 bytes
    log = tmp_path_factory.mktemp("ray-start") / "ray-start.log"
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {
        **os.environ,
        **auth,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no node drain on SIGTERM: nothing to hand over
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "AUTOSCALER_METRIC_PORT": str(free_port()),
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--include-dashboard=false",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = processes.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    cluster = Cluster(proc, f"127.0.0.1:{port}", auth, log)
    try:
        while "Ray runtime started." not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < started + 90, log.read_text(errors="replace")
            time.sleep(0.2)
        print(f"cluster started in {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        psutil.wait_procs(cluster.members(), timeout=30)
        left = cluster.members()
        names = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                names.append(" ".join(p.cmdline())[:120])
                p.kill()
        processes.kill_group(proc)
        shutil.rmtree(temp, ignore_errors=True)
        print(f"cluster stopped in {time.monotonic() - stopping:.1f}s")
        assert not left, names


def serve_on(cluster: Cluster, home: Path, replicas: int) -> RemoteServer:
    args = ["--engine", "ray", "--replicas", str(replicas), "--ray-address", cluster.address, "--no-grpc"]
    return RemoteServer(home, args=args, env=cluster.auth, ready_timeout_s=120)


def until_serving(server: RemoteServer, client: httpx.Client, replicas: int) -> None:
    deadline = time.monotonic() + 120
    # /ready is answered by one replica first; the line is printed once Ray Serve has them all running.
    while f"with {replicas} Ray Serve replicas" not in server.log() or len(answering(client, 10)) < replicas:
        assert server.alive() and time.monotonic() < deadline, server.log()
        time.sleep(0.2)


@pytest.fixture
def registry_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    Registry(home=home).register(make_linear_model(tmp_path / "v1.onnx", seed=1), "linear", alias="production")
    return home


@pytest.mark.slow
@needs_ray
def test_replicas_run_on_the_cluster_and_only_the_app_goes_on_ctrl_c(cluster: Cluster, registry_home: Path) -> None:
    with serve_on(cluster, registry_home, 2) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        until_serving(server, client, 2)
        assert len(answering(client, 20)) == 2
        replicas = cluster.running("ray::ServeReplica:maas:")
        assert len(replicas) == 2  # in the cluster's processes, not under maas serve
        assert cluster.applications() == ["maas"]

        assert server.proc is not None
        front = psutil.Process(server.proc.pid)
        ports = listening([*cluster.members(), front, *front.children(recursive=True)])
        assert {name for name, _, _ in ports} >= {"gcs_server", "raylet"}
        assert any(port == server.port for _, _, port in ports)
        assert listening(replicas)  # each replica's own gRPC servers are among those checked
        assert {ip for _, ip, _ in ports} <= LOOPBACK, sorted(ports)

        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0, server.log()
    _, alive = psutil.wait_procs(replicas, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert cluster.proc.poll() is None
    assert cluster.running("ray::ServeController")  # Serve keeps running on the cluster, without maas
    assert cluster.applications() == []


@pytest.mark.slow
@needs_ray
def test_a_second_maas_serve_deploys_again_and_stops_on_sigterm(cluster: Cluster, registry_home: Path) -> None:
    with serve_on(cluster, registry_home, 1) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        until_serving(server, client, 1)
        replicas = cluster.running("ray::ServeReplica:maas:")
        assert len(replicas) == 1
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()
        assert "Deleting app ['maas']" in server.log()
    _, alive = psutil.wait_procs(replicas, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert cluster.proc.poll() is None and cluster.running("ray::ServeController")


def serve_at(address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "maas", "serve", "--engine", "ray", "--ray-address", address]
    return processes.run([*cmd, "--port", str(free_port()), "--no-grpc"], env=env, text=True, timeout=60)


def test_a_ray_client_address_is_refused_before_ray_starts(home: Path, cli_env: dict[str, str]) -> None:
    proc = serve_at("ray://127.0.0.1:10001", cli_env)
    assert proc.returncode == 1, proc.stderr
    assert "Ray Client does not support" in proc.stderr and "HOST:PORT" in proc.stderr, proc.stderr


def test_an_address_where_no_cluster_answers_is_refused_at_once(home: Path, cli_env: dict[str, str]) -> None:
    proc = serve_at(f"127.0.0.1:{free_port()}", cli_env)  # Ray itself would try it for minutes
    assert proc.returncode == 1 and "no Ray cluster answers there" in proc.stderr, proc.stderr
