"""``maas serve --workers 2``: two full servers on one HTTP and one gRPC port behind a supervisor. Connections are
spread over both, both follow the registry, /metrics counts both, a killed worker is replaced without a failed
request, and Ctrl-C stops every process."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from maas.registry import Registry
from maas.testing import processes
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, free_port

pytestmark = pytest.mark.slow

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
WORKER = "x-maas-worker"


@contextlib.contextmanager
def serving(home: Path) -> Iterator[RemoteServer]:
    with RemoteServer(home, args=["--workers", "2"]) as server:
        deadline = time.monotonic() + 60
        while "with 2 workers" not in server.log():  # printed once both are ready (one answers /ready before)
            assert server.alive() and time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        yield server


def infer(server: RemoteServer) -> httpx.Response:
    """One request on a connection of its own: the kernel picks the worker per connection."""
    response = httpx.post(f"{server.url}/v2/models/linear/infer", json=ROW, timeout=10)
    assert response.status_code == 200, response.text
    return response


def workers_of(server: RemoteServer) -> list[psutil.Process]:
    assert server.proc is not None
    children: list[psutil.Process] = psutil.Process(server.proc.pid).children()
    return children


def requests_counted(server: RemoteServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "maas_inference_requests"
        for s in family.samples
        if s.name == "maas_inference_requests_total"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Registry]]:
    """Two workers over a registry holding `linear` 1 (production) and 2."""
    home = tmp_path_factory.mktemp("workers-home")
    models = tmp_path_factory.mktemp("m")
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "v1.onnx", seed=1), "linear", alias="production")
    reg.register(make_linear_model(models / "v2.onnx", seed=2), "linear")
    with serving(home) as server:
        yield server, reg


def test_connections_are_spread_over_both_workers(served: tuple[RemoteServer, Registry]) -> None:
    server, _ = served
    assert len(workers_of(server)) == 2
    assert {infer(server).headers[WORKER] for _ in range(40)} == {"0", "1"}

    x = np.ones((3, 4), dtype=np.float32)
    for _ in range(10):  # a channel each: both workers serve gRPC on the shared port too
        with grpcclient.InferenceServerClient(server.grpc_address) as client:
            inp = grpcclient.InferInput("x", [3, 4], "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("linear", [inp]).as_numpy("y").shape == (3, 2)


def test_an_alias_move_reaches_both_workers_within_2s(served: tuple[RemoteServer, Registry]) -> None:
    server, reg = served
    current = reg.resolve("models:/linear@production").version
    target = 3 - current  # 1 <-> 2
    assert {infer(server).json()["model_version"] for _ in range(20)} == {str(current)}

    reg.set_alias("linear", "production", target)  # from this process: the workers only see the database
    moved = time.monotonic()
    late: list[tuple[str, str]] = []  # (worker, version) of answers from 2 s after the move on
    while time.monotonic() < moved + 3.0:
        response = infer(server)
        if time.monotonic() - moved >= 2.0:
            late.append((response.headers[WORKER], response.json()["model_version"]))
    assert {version for _, version in late} == {str(target)}, late
    assert {worker for worker, _ in late} == {"0", "1"}


def test_metrics_add_up_the_requests_of_both_workers(served: tuple[RemoteServer, Registry]) -> None:
    server, _ = served
    before = requests_counted(server)
    answered_by = {infer(server).headers[WORKER] for _ in range(30)}
    with grpcclient.InferenceServerClient(server.grpc_address) as client:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        for _ in range(5):
            client.infer("linear", [inp])
    assert answered_by == {"0", "1"}
    assert requests_counted(server) - before == 35


def test_a_killed_worker_is_replaced_without_a_failed_request(served: tuple[RemoteServer, Registry]) -> None:
    server, _ = served
    before = workers_of(server)
    victim = before[0]
    victim.send_signal(signal.SIGKILL)
    # Gone (its sockets closed) once it is a zombie waiting for the supervisor, or reaped.
    while victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)

    answered_by = {infer(server).headers[WORKER] for _ in range(20)}  # the other worker answers them all
    assert len(answered_by) == 1

    def replacement() -> list[psutil.Process]:
        return [p for p in workers_of(server) if p not in before and f"(pid {p.pid}) ready" in server.log()]

    deadline = time.monotonic() + 60
    while not replacement():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert f"(pid {victim.pid}) was killed by SIGKILL" in server.log()
    assert not victim.is_running()  # reaped by the supervisor
    # The replacement joined the port once ready: both answer again, and nothing failed meanwhile (infer asserts).
    deadline = time.monotonic() + 10
    while {infer(server).headers[WORKER] for _ in range(20)} != {"0", "1"}:
        assert time.monotonic() < deadline


def test_sigint_stops_the_supervisor_and_every_worker(tmp_path: Path) -> None:
    reg = Registry(home=tmp_path / "home")
    reg.register(make_linear_model(tmp_path / "linear.onnx"), "linear")
    with serving(tmp_path / "home") as server:
        workers = workers_of(server)
        metrics_dir = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()
        infer(server)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0, server.log()
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive and not workers_serving(tmp_path / "home"), [p.pid for p in alive]
        assert not metrics_dir.parent.exists()  # the supervisor's private folder (sockets, metrics) is removed
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v2/health/live", timeout=2)


def test_a_port_in_use_is_refused_before_any_worker_starts(home: Path, cli_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "maas", "serve", "--workers", "2", "--port", str(port)]
        cmd += ["--grpc-port", str(free_port())]
        proc = processes.run(cmd, env=cli_env, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"HTTP port {port} on 127.0.0.1 is taken" in proc.stderr and "--port" in proc.stderr


def test_workers_that_keep_failing_to_start_stop_the_supervisor(home: Path, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "MAAS_DATABASE_URL": "nosuchdb://nowhere"}  # read by the workers, not the supervisor
    cmd = [sys.executable, "-m", "maas", "serve", "--workers", "2", "--port", str(free_port()), "--no-grpc"]
    proc = processes.run(cmd, env=env, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed to start 3 times in a row and no worker is serving" in proc.stderr
    assert not workers_serving(home)


def test_one_worker_is_the_single_process_server(tmp_path: Path) -> None:
    Registry(home=tmp_path / "home").register(make_linear_model(tmp_path / "linear.onnx"), "linear")
    with RemoteServer(tmp_path / "home", args=["--workers", "1"]) as server:
        assert server.proc is not None and not psutil.Process(server.proc.pid).children()
        assert WORKER not in infer(server).headers


def workers_serving(home: Path) -> list[psutil.Process]:
    """Worker processes left over from a server of ``home``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "maas.serving.worker" in (p.info["cmdline"] or []) and p.environ().get("MAAS_HOME") == str(home):
                found.append(p)
    return found
