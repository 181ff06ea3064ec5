"""Deployments on a running server: dynamic batching that gives every request its own answer, deployment changes
followed within 2 s without failing a request, and an overloaded queue answered 429 at once with bounded memory."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer

pytestmark = pytest.mark.slow


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


class Load:
    """Client threads sending requests of 1 to 4 rows back to back; every answer checked against onnxruntime."""

    def __init__(self, url: str, session: ort.InferenceSession, threads: int = 8) -> None:
        self.url = url
        self.session = session
        self.stop = threading.Event()
        self.ok = 0
        self.rows = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                x = rng.standard_normal((int(rng.integers(1, 5)), 4)).astype(np.float32)
                try:
                    r = client.post("/v2/models/lin/infer", json=_body(x))
                    if r.status_code != 200:
                        raise AssertionError(f"{r.status_code}: {r.text[:200]}")
                    y = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(len(x), 2)
                    np.testing.assert_allclose(y, self.session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
                    with self.lock:
                        self.ok += 1
                        self.rows += len(x)
                except Exception as exc:
                    with self.lock:
                        self.failures.append(repr(exc)[:300])

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture
def linear(tmp_path: Path) -> tuple[Path, ort.InferenceSession]:
    path = make_linear_model(tmp_path / "lin.onnx")
    home = tmp_path / "home"
    Registry(home=home).register(path, "lin")
    return home, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _deploy(home: Path, *args: str) -> None:
    env = {"MAAS_HOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "maas", "deploy", "lin", *args], env=env, check=True, capture_output=True)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_deployment_changes_are_followed_within_2s_without_failing_a_request(
    linear: tuple[Path, ort.InferenceSession],
) -> None:
    home, session = linear
    with RemoteServer(home) as server, Load(server.url, session) as load:
        config = httpx.get(f"{server.url}/v2/models/lin/config").json()
        assert config["max_batch_size"] == 1 and "dynamic_batching" not in config
        time.sleep(1.0)
        for args, check in [
            (("--max-batch-size", "16", "--instances", "2"), lambda c: c["max_batch_size"] == 16),
            (
                ("--threads", "1", "--max-queue-delay-ms", "2"),
                lambda c: c["parameters"]["threads"]["string_value"] == "1",
            ),
            (
                (
                    "--max-batch-size",
                    "4",
                ),
                lambda c: c["max_batch_size"] == 4,
            ),
        ]:
            _deploy(home, *args)
            changed = time.monotonic()
            while not check(config := httpx.get(f"{server.url}/v2/models/lin/config").json()):
                assert time.monotonic() - changed < 2.0, f"deployment {args} not followed within 2 s: {config}"
                time.sleep(0.05)
            time.sleep(1.0)  # traffic on the new deployment (a threads change reloads the runtime meanwhile)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert not load.failures, load.failures[:5]
    assert load.ok > 100
    batches = _metric(metrics, "maas_batch_size_count")
    rows = _metric(metrics, "maas_batch_size_sum")
    # Unbatched, a model call runs one request: rows per call would be the rows per request exactly.
    assert batches > 0 and rows / batches > 1.1 * load.rows / load.ok, (batches, rows, load.rows, load.ok)


def test_a_full_queue_is_429_at_once_memory_stays_bounded_and_service_returns(
    linear: tuple[Path, ort.InferenceSession],
) -> None:
    home, session = linear
    _deploy(home, "--max-batch-size", "8", "--max-queue-size", "2", "--max-queue-delay-ms", "20")
    x = np.ones((1, 4), np.float32)
    body = _body(x)
    with RemoteServer(home) as server:
        process = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
        with httpx.Client(base_url=server.url) as client:
            for _ in range(50):
                assert client.post("/v2/models/lin/infer", json=body).status_code == 200
        before = process.memory_info().rss
        statuses: list[int] = []
        retry_after: set[str | None] = set()
        lock = threading.Lock()
        stop = time.monotonic() + 5.0

        def storm() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while time.monotonic() < stop:
                    r = client.post("/v2/models/lin/infer", json=body)
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 429:
                            retry_after.add(r.headers.get("retry-after"))

        threads = [threading.Thread(target=storm) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        grown = process.memory_info().rss - before
        assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        assert retry_after == {"1"}
        assert grown < 100 * 1024 * 1024, f"server memory grew {grown / 2**20:.0f} MB under overload"
        with httpx.Client(base_url=server.url) as client:  # service is back at once
            r = client.post("/v2/models/lin/infer", json=body)
            assert r.status_code == 200
            y = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 2)
            np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
