"""``maas serve --engine ray --replicas 2``: the maas app as a Ray Serve deployment on a local Ray. Requests are spread
over both replicas, both follow an alias move, a replica killed while a client keeps sending is replaced and fails
at most the request it was running, and every port Ray opens is on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from maas.registry import Registry
from maas.testing import processes
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="Ray Serve not installed: pip install 'maas[ray]'"
    ),
]

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
REPLICA = "x-maas-replica"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def infer(client: httpx.Client) -> httpx.Response:
    response = client.post("/v2/models/linear/infer", json=ROW)
    assert response.status_code == 200, response.text
    return response


def replicas_of(home: Path) -> list[psutil.Process]:
    """The Ray Serve replica processes serving ``home`` (the MAAS_* settings reach them through Ray's runtime_env)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::ServeReplica:maas:") and p.environ().get("MAAS_HOME") == str(home):
                found.append(p)
    return found


def answering(client: httpx.Client, count: int = 40) -> set[str]:
    return {infer(client).headers[REPLICA] for _ in range(count)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Registry, httpx.Client]]:
    """Two replicas over a registry holding `linear` 1 (production) and 2."""
    home = tmp_path_factory.mktemp("ray-home")
    models = tmp_path_factory.mktemp("m")
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "v1.onnx", seed=1), "linear", alias="production")
    reg.register(make_linear_model(models / "v2.onnx", seed=2), "linear")
    started = time.monotonic()
    with (
        RemoteServer(home, args=["--engine", "ray", "--replicas", "2"], ready_timeout_s=240) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        deadline = time.monotonic() + 120
        # /ready is answered by one replica first; the line is printed once Ray Serve has them all running.
        while "with 2 Ray Serve replicas" not in server.log() or len(answering(client, 10)) < 2:
            assert server.alive() and time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        print(f"two replicas serving after {time.monotonic() - started:.1f}s")
        yield server, reg, client
        assert server.proc is not None
        children = psutil.Process(server.proc.pid).children(recursive=True)
        server.proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        assert server.proc.wait(timeout=60) == 0, server.log()
        _, alive = psutil.wait_procs(children, timeout=20)
        print(f"stopped in {time.monotonic() - stopping:.1f}s")
        assert not alive, [p.cmdline() for p in alive]


def test_requests_are_spread_over_both_replicas(served: tuple[RemoteServer, Registry, httpx.Client]) -> None:
    server, _, client = served
    assert len(answering(client)) == 2
    assert len(replicas_of(server.home)) == 2
    metrics = client.get("/metrics")  # each replica's own metrics; a request lands on one of them
    assert metrics.status_code == 200 and "maas_inference_requests_total" in metrics.text


def test_an_alias_move_reaches_both_replicas_within_2s(served: tuple[RemoteServer, Registry, httpx.Client]) -> None:
    _, reg, client = served
    current = reg.resolve("models:/linear@production").version
    target = 3 - current
    assert {infer(client).json()["model_version"] for _ in range(20)} == {str(current)}

    reg.set_alias("linear", "production", target)  # from this process: the replicas only see the database
    moved = time.monotonic()
    late: list[tuple[str, str]] = []  # (replica, version) of answers from 2 s after the move on
    while time.monotonic() < moved + 3.0:
        response = infer(client)
        if time.monotonic() - moved >= 2.0:
            late.append((response.headers[REPLICA], response.json()["model_version"]))
    assert {version for _, version in late} == {str(target)}, late
    assert len({replica for replica, _ in late}) == 2


def test_every_port_ray_opens_is_on_loopback(served: tuple[RemoteServer, Registry, httpx.Client]) -> None:
    server, _, _ = served
    assert server.proc is not None
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    listening = set()
    for p in tree:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.add((p.name(), c.laddr.ip, c.laddr.port))
    assert any(port == server.port for _, _, port in listening)
    assert {ip for _, ip, _ in listening} <= LOOPBACK, sorted(listening)


def test_a_killed_replica_is_replaced_and_fails_at_most_what_it_was_running(
    served: tuple[RemoteServer, Registry, httpx.Client],
) -> None:
    server, _, client = served
    before = answering(client)
    replicas = replicas_of(server.home)
    assert len(replicas) == 2
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_sending() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            while not stop.is_set():
                try:
                    response = own.post("/v2/models/linear/infer", json=ROW)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    answers.append(response.headers[REPLICA])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(1.0)
        killed = time.monotonic()
        replicas[0].send_signal(signal.SIGKILL)
        deadline = killed + 90
        while len(set(answers[-40:]) - before) < 1 or len(set(answers[-40:])) < 2:  # a new replica answers too
            assert time.monotonic() < deadline and server.alive(), (failures[:5], server.log()[-3000:])
            time.sleep(0.1)
        print(f"replaced in {time.monotonic() - killed:.1f}s; {len(answers)} answered, {len(failures)} failed")
    finally:
        stop.set()
        sender.join()
    # Ray Serve retries a request on another replica unless the dead one had accepted it: only a request the killed
    # replica was running fails (a 500). One client sending one request at a time has at most one such request.
    assert len(failures) <= 1 and all(f.startswith("500") for f in failures), failures[:5]
    assert len(replicas_of(server.home)) == 2


def test_replicas_need_the_ray_engine(home: Path, cli_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "maas", "serve", "--replicas", "2", "--port", str(free_port()), "--no-grpc"]
    proc = processes.run(cmd, env=cli_env, text=True, timeout=60)
    assert proc.returncode == 2 and "need --engine ray" in proc.stderr


def test_autoscale_is_checked_before_ray_starts(home: Path, cli_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "maas", "serve", "--engine", "ray", "--autoscale", "3:1", "--port", str(free_port())]
    proc = processes.run(cmd, env=cli_env, text=True, timeout=60)
    assert proc.returncode == 1 and "expected MIN:MAX replicas" in proc.stderr, proc.stderr
