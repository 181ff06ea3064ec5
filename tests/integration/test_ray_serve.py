"""``maas serve --engine ray --replicas 2``: the maas app as a Ray Serve deployment on a local Ray behind maas' front.
Requests are spread over both replicas, both follow an alias move, streams are relayed part by part and cancelled
when their client leaves, the front bounds bodies and survives bad clients, replicas killed while clients keep
sending are replaced without a single failed request (REST and gRPC), gRPC is served through the front as by plain
`maas serve`, and every port Ray opens is on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from maas.registry import Registry
from maas.testing import processes
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, free_port, scraped
from tests.llm_fixtures import write_tiny_llm_dir
from tests.ray_helpers import LOOPBACK, REPLICA, ROW, answering, infer, listening

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="Ray Serve not installed: pip install 'maas[ray]'"
    ),
]

LIMIT = 1 << 20  # MAAS_MAX_REQUEST_BYTES of the server under test


def grpc_row() -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([ROW["inputs"][0]["data"]], dtype=np.float32))
    return [x]


def replicas_of(home: Path) -> list[psutil.Process]:
    """The Ray Serve replica processes serving ``home`` (the MAAS_* settings reach them through Ray's runtime_env)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::ServeReplica:maas:") and p.environ().get("MAAS_HOME") == str(home):
                found.append(p)
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Registry, httpx.Client]]:
    """Two replicas over a registry holding `linear` 1 (production) and 2, and `chat` (a tiny language model)."""
    home = tmp_path_factory.mktemp("ray-home")
    models = tmp_path_factory.mktemp("m")
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "v1.onnx", seed=1), "linear", alias="production")
    reg.register(make_linear_model(models / "v2.onnx", seed=2), "linear")
    reg.register(write_tiny_llm_dir(models / "tiny", max_position_embeddings=8192), "chat", format="causal_lm")
    started = time.monotonic()
    env = {"MAAS_MAX_REQUEST_BYTES": str(LIMIT), "MAAS_LLM_KV_CACHE_MB": "64"}
    with (
        RemoteServer(home, args=["--engine", "ray", "--replicas", "2"], env=env, ready_timeout_s=240) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        deadline = time.monotonic() + 120
        # /ready is answered by one replica first; the line is printed (wrapped) once Ray Serve has them all running.
        while "with 2 Ray Serve replicas" not in " ".join(server.log().split()) or len(answering(client, 10)) < 2:
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


def test_requests_are_spread_over_both_replicas_and_counted_together(
    served: tuple[RemoteServer, Registry, httpx.Client],
) -> None:
    server, _, client = served

    def served_so_far() -> dict[str, float]:  # as each replica counts: a scrape lands on one of them
        out: dict[str, float] = {}
        while len(out) < 2:
            scrape = client.get("/metrics")
            assert scrape.status_code == 200
            out[scrape.headers[REPLICA]] = scraped(scrape.text, "maas_inference_requests_total", model="linear")
        return out

    before = served_so_far()
    assert len(answering(client)) == 2  # 40 requests, answered by both
    assert len(replicas_of(server.home)) == 2
    after = served_so_far()
    # The replicas share one set of metric files (as --workers do): each shows the 40 requests, not its own share.
    assert {replica: after[replica] - before[replica] for replica in after} == dict.fromkeys(after, 40.0)


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
    sockets = listening(tree)
    assert any(port == server.port for _, _, port in sockets)
    assert {ip for _, ip, _ in sockets} <= LOOPBACK, sorted(sockets)


def test_a_stream_is_relayed_part_by_part_and_cancelled_when_its_client_leaves(
    served: tuple[RemoteServer, Registry, httpx.Client],
) -> None:
    _, _, client = served
    ask = {"model": "chat", "messages": [{"role": "user", "content": "Hello, world!"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json={**ask, "max_tokens": 20}) as whole:
        assert whole.status_code == 200 and whole.headers["content-type"].startswith("text/event-stream")
        events = [line for line in whole.iter_lines() if line.startswith("data: ")]
    assert len(events) > 3 and events[-1] == "data: [DONE]"

    # A long generation left after a few pieces: had the front waited for the whole answer, it would have ended
    # ("length" or "stop"); relayed part by part, the client's leaving reaches the replica's app, which cancels it.
    # Four long choices: the tiny random model may end one by chance before the cancel arrives, hardly all four.
    with client.stream("POST", "/v1/chat/completions", json={**ask, "max_tokens": 8000, "n": 4}) as partial:
        replica = partial.headers[REPLICA]
        pieces = 0
        for line in partial.iter_lines():
            pieces += line.startswith("data: ")
            if pieces == 8:
                break
    deadline = time.monotonic() + 20
    while True:
        scrape = client.get("/metrics")  # each replica's own counters: read until the stream's replica answers
        counted = scraped(scrape.text, "maas_llm_requests_total", model="chat", reason="cancelled")
        if scrape.headers[REPLICA] == replica and counted >= 1:
            break
        assert time.monotonic() < deadline, (replica, scrape.headers[REPLICA], scrape.text[-1500:])
        time.sleep(0.1)


def test_a_body_over_the_limit_is_refused_by_the_front(served: tuple[RemoteServer, Registry, httpx.Client]) -> None:
    _, _, client = served
    declared = client.post("/v2/models/linear/infer", content=b" " * (LIMIT + 1))
    assert declared.status_code == 413 and "MAAS_MAX_REQUEST_BYTES" in declared.json()["error"]
    assert REPLICA not in declared.headers  # answered by the front: nothing was forwarded

    def pieces() -> Iterator[bytes]:  # no content-length: found over the limit while reading
        for _ in range(LIMIT // 65536 + 2):
            yield b" " * 65536

    chunked = client.post("/v2/models/linear/infer", content=pieces())
    assert chunked.status_code == 413 and REPLICA not in chunked.headers
    assert infer(client).status_code == 200

    # A keyless loopback server refuses another host's name (DNS rebinding) at the front, before reading the body.
    foreign = client.post("/v2/models/linear/infer", json=ROW, headers={"Host": "rebound.example"})
    assert foreign.status_code == 403 and REPLICA not in foreign.headers


def _raw(server: RemoteServer, data: bytes, *, read: bool = True) -> bytes:
    """What the server answers to ``data`` sent as is, until it closes the connection (b"reset" if it resets it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return received or b"reset"
        return received


def test_bad_requests_and_leaving_clients_leave_the_front_serving(
    served: tuple[RemoteServer, Registry, httpx.Client],
) -> None:
    server, _, client = served
    huge = _raw(server, b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000)  # never ends
    assert huge.startswith(b"HTTP/1.1 431") or huge == b"reset", huge[:200]
    assert _raw(server, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    # A body cut off by the client, and a client gone before its answer: neither reaches past the front's read,
    # or both are dropped without trouble.
    head = b"POST /v2/models/linear/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    _raw(server, head + b"content-length: 1000\r\n\r\n" + b'{"inputs": ', read=False)
    body = json.dumps(ROW).encode()
    for _ in range(5):
        _raw(server, head + b"content-length: %d\r\n\r\n" % len(body) + body, read=False)
    assert server.alive() and infer(client).status_code == 200
    assert "Traceback" not in server.log()


def test_grpc_is_served_through_the_front_as_by_plain_maas_serve(
    served: tuple[RemoteServer, Registry, httpx.Client],
) -> None:
    server, _, client = served
    with grpcclient.InferenceServerClient(server.grpc_address) as grpc_client:
        assert grpc_client.is_server_live() and grpc_client.is_server_ready()
        meta = grpc_client.get_model_metadata("linear", as_json=True)
        assert meta["name"] == "linear" and [i["name"] for i in meta["inputs"]] == ["x"]
        rest = infer(client).json()
        got = grpc_client.infer("linear", grpc_row())
        assert got.get_response().model_version == rest["model_version"]
        for output in rest["outputs"]:
            assert got.as_numpy(output["name"]).ravel().tolist() == pytest.approx(output["data"], rel=1e-6)
        with pytest.raises(InferenceServerException) as info:
            grpc_client.get_model_metadata("nope")
        assert info.value.status() == str(grpc.StatusCode.NOT_FOUND) and "'nope'" in str(info.value.message())
        with pytest.raises(InferenceServerException) as info:
            grpc_client.infer("nope", grpc_row())
        assert info.value.status() == str(grpc.StatusCode.NOT_FOUND) and "'nope'" in str(info.value.message())


def _replaced(server: RemoteServer, answers: list[str], before: set[str], failures: list[str], killed: float) -> None:
    """Wait until a replica not in ``before`` answers, and two answer, among the latest answers."""
    while len(set(answers[-40:]) - before) < 1 or len(set(answers[-40:])) < 2:
        assert time.monotonic() < killed + 90 and server.alive(), (failures[:5], server.log()[-3000:])
        time.sleep(0.1)


def test_replicas_killed_under_load_fail_no_request(served: tuple[RemoteServer, Registry, httpx.Client]) -> None:
    server, _, client = served
    first = answering(client)
    originals = replicas_of(server.home)
    assert len(originals) == 2 and len(first) == 2
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_sending(path: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set():
                try:
                    response = own.post(path, json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    answers.append(response.headers[REPLICA])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    # Four clients of quick inferences, and two of generations long enough that a replica is nearly always running
    # some when it is killed (so requests do die with it, and are sent again).
    chat = {"model": "chat", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 100, "n": 2}
    senders = [threading.Thread(target=keep_sending, args=("/v2/models/linear/infer", ROW)) for _ in range(4)]
    senders += [threading.Thread(target=keep_sending, args=("/v1/chat/completions", chat)) for _ in range(2)]
    called: list[int] = []  # gRPC answers (they name no replica)

    def keep_calling() -> None:
        with grpcclient.InferenceServerClient(server.grpc_address) as own:
            while not stop.is_set():
                try:
                    own.infer("linear", grpc_row(), client_timeout=60)
                    called.append(1)
                except InferenceServerException as exc:
                    failures.append(f"gRPC {exc.status()} {exc.message()}"[:200])

    senders.append(threading.Thread(target=keep_calling))
    for sender in senders:
        sender.start()
    try:
        time.sleep(1.0)
        # Kill one replica, wait for its replacement, then kill the other original: every request either replica was
        # running when it died is sent again to a live one by the front.
        for victim in originals:
            before = set(answers[-40:])
            killed = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            _replaced(server, answers, before, failures, killed)
            print(f"replaced in {time.monotonic() - killed:.1f}s; {len(answers)} answered, {len(failures)} failed")
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    assert failures == [], failures[:5]
    assert len(called) > 0
    assert len(replicas_of(server.home)) == 2
    assert not set(answers[-40:]) & first  # both originals gone, their replacements answering
    called_again = server.log().count("gRPC ModelInfer: the replica died")
    retried = server.log().count("; trying another") - called_again
    print(f"{retried} requests died with their replica and were sent again")
    print(f"gRPC: {len(called)} calls answered, {called_again} sent again after their replica died")
    assert retried >= 1

    # The killed replicas' live gauges (models loaded, requests running) leave the shared metrics: only files of
    # living processes stay.
    folders = {p.environ()["PROMETHEUS_MULTIPROC_DIR"] for p in replicas_of(server.home)}
    assert len(folders) == 1
    folder = Path(folders.pop())
    deadline = time.monotonic() + 10
    while stale := [f.name for f in folder.glob("gauge_live*.db") if not psutil.pid_exists(_pid_of(f))]:
        assert time.monotonic() < deadline, stale
        time.sleep(0.2)


def _pid_of(metric_file: Path) -> int:
    return int(metric_file.stem.rsplit("_", 1)[1])


def test_replicas_need_the_ray_engine(home: Path, cli_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "maas", "serve", "--replicas", "2", "--port", str(free_port()), "--no-grpc"]
    proc = processes.run(cmd, env=cli_env, text=True, timeout=60)
    assert proc.returncode == 2 and "need --engine ray" in proc.stderr


def test_autoscale_is_checked_before_ray_starts(home: Path, cli_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "maas", "serve", "--engine", "ray", "--autoscale", "3:1", "--port", str(free_port())]
    proc = processes.run(cmd, env=cli_env, text=True, timeout=60)
    assert proc.returncode == 1 and "expected MIN:MAX replicas" in proc.stderr, proc.stderr
