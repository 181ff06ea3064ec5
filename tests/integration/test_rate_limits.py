"""Rate limits and quotas are enforced, not advisory, by a real server requiring keys: `--workers 2` and a second
server process on the same database (counters in that database, or in a real redis-server with MAAS_REDIS_URL)
together admit exactly a key's limit under 8 hammering clients, and answer the rest 429 with ``Retry-After`` and the
``x-ratelimit-*`` headers OpenAI clients read. A concurrency limit holds across workers, and a finished request's
slot is free for the client's next request."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from maas.access.keys import KeyStore, database_of
from maas.access.principal import KeyLimits
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer
from tests import redis_fixture

pytestmark = pytest.mark.slow

redis_url = redis_fixture.redis_url

INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
CLIENTS = 8
#: A duration as OpenAI writes it (x-ratelimit-reset-*): 250ms, 59.5s, 1m0.9s, 14h0m0s.
DURATION = re.compile(r"(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)")


@dataclass
class Deployment:
    home: Path
    workers: RemoteServer  # maas serve --workers 2
    single: RemoteServer  # a second server process on the same database

    def key(self, **limits: int) -> tuple[str, str]:
        key, token = KeyStore(database_of(Registry(home=self.home))).create(
            "load", "consumer", models=["alpha"], limits=KeyLimits(**limits)
        )
        return key.id, token


def _wait_for_workers(server: RemoteServer) -> None:
    deadline = time.monotonic() + 90
    while "with 2 workers" not in server.log():  # printed once both are ready
        assert server.alive() and time.monotonic() < deadline, server.log()
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["sql", "redis"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = {"MAAS_AUTH": "required"}
    if request.param == "redis":
        env["MAAS_REDIS_URL"] = request.getfixturevalue("redis_url")
    home = tmp_path_factory.mktemp(f"limits-{request.param}")
    Registry(home=home).register(make_linear_model(tmp_path_factory.mktemp("m") / "alpha.onnx"), "alpha")
    with RemoteServer(home, args=["--workers", "2"], env=env) as workers, RemoteServer(home, env=env) as single:
        _wait_for_workers(workers)
        yield Deployment(home, workers, single)


@dataclass
class Answer:
    server: str
    worker: str | None
    status: int
    headers: httpx.Headers


def hammer(servers: list[RemoteServer], token: str, seconds: float) -> list[Answer]:
    """CLIENTS threads sending inference requests as fast as they can for ``seconds``, spread over ``servers``, each
    request on a new connection (so the kernel spreads them over the workers too)."""
    stop = time.monotonic() + seconds
    answers: list[Answer] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        server = servers[i % len(servers)]
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, limits=no_keepalive, timeout=30) as c:
            while time.monotonic() < stop:
                r = c.post("/v2/models/alpha/infer", json=INFER)
                with lock:
                    answers.append(Answer(server.url, r.headers.get("x-maas-worker"), r.status_code, r.headers))

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return answers


def check_refusals(answers: list[Answer], limit: int) -> None:
    refused = [a for a in answers if a.status == 429]
    assert refused, "the hammering never reached the limit"
    for a in refused:
        assert int(a.headers["retry-after"]) >= 1
        assert a.headers["x-ratelimit-limit-requests"] == str(limit)
        assert a.headers["x-ratelimit-remaining-requests"] == "0"
        assert DURATION.fullmatch(a.headers["x-ratelimit-reset-requests"]), a.headers["x-ratelimit-reset-requests"]


def test_a_rate_limit_holds_across_workers(deployment: Deployment) -> None:
    _, token = deployment.key(rpm=120)
    answers = hammer([deployment.workers], token, seconds=4)
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {200, 429}, statuses
    assert statuses[200] == 120, statuses  # exactly the limit: never N x the limit, never less
    assert len({a.worker for a in answers if a.status == 200}) == 2  # both workers admitted some
    ok = [a for a in answers if a.status == 200]
    assert {a.headers["x-ratelimit-limit-requests"] for a in ok} == {"120"}
    assert min(int(a.headers["x-ratelimit-remaining-requests"]) for a in ok) == 0
    assert all(DURATION.fullmatch(a.headers["x-ratelimit-reset-requests"]) for a in ok)
    check_refusals(answers, 120)
    retry = max(int(a.headers["retry-after"]) for a in answers if a.status == 429)
    assert 50 <= retry <= 61  # the first admissions leave the sliding minute about a minute after they came


def test_a_rate_limit_holds_across_server_processes_on_one_database(deployment: Deployment) -> None:
    _, token = deployment.key(rpm=120)
    answers = hammer([deployment.workers, deployment.single], token, seconds=4)
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {200, 429} and statuses[200] == 120, statuses
    assert len({a.server for a in answers if a.status == 200}) == 2
    check_refusals(answers, 120)


def test_a_day_quota_holds_across_workers_and_servers(deployment: Deployment) -> None:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    if (midnight - now).total_seconds() < 30:
        time.sleep((midnight - now).total_seconds() + 1)  # one UTC day for the whole test
    _, token = deployment.key(requests_per_day=30)
    answers = hammer([deployment.workers, deployment.single], token, seconds=2)
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {200, 429} and statuses[200] == 30, statuses
    check_refusals(answers, 30)
    refused = next(a for a in answers if a.status == 429)
    until_midnight = (midnight - datetime.now(UTC)).total_seconds()
    assert abs(int(refused.headers["retry-after"]) - until_midnight) < 15
    body = httpx.post(
        f"{deployment.single.url}/v2/models/alpha/infer", json=INFER, headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert "30 requests per UTC day" in body["error"]


def _held_request(server: RemoteServer, token: str, sent: threading.Event, go: threading.Event) -> httpx.Response:
    """An inference request whose body arrives only once ``go`` is set: in flight (admitted) until then."""

    def body() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "x", "shape": [1, 4], '
        sent.set()
        go.wait(30)
        yield b'"datatype": "FP32", "data": [1, 2, 3, 4]}]}'

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/v2/models/alpha/infer", content=body(), headers=headers, timeout=60)


def test_a_concurrency_limit_holds_across_workers_and_frees_at_once(deployment: Deployment) -> None:
    _, token = deployment.key(concurrent=2)
    server = deployment.workers
    headers = {"Authorization": f"Bearer {token}"}
    go = threading.Event()
    sent = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_held_request, server, token, s, go) for s in sent]
        try:
            for s in sent:
                assert s.wait(30)
            time.sleep(1.0)  # both admitted by now (each on its own connection: either worker)
            thirds = [httpx.post(f"{server.url}/v2/models/alpha/infer", json=INFER, headers=headers) for _ in range(6)]
            assert {r.status_code for r in thirds} == {429}, [r.text for r in thirds]
            assert "2 requests in flight" in thirds[0].json()["error"]
            assert int(thirds[0].headers["retry-after"]) >= 1
        finally:
            go.set()
        assert [f.result().status_code for f in held] == [200, 200]
    # Each request's slot is free before its answer ends: one client's requests one after another never wait.
    for _ in range(12):
        r = httpx.post(f"{server.url}/v2/models/alpha/infer", json=INFER, headers=headers)
        assert r.status_code == 200, r.text
