"""Alias moves and rollbacks reach a running server within 2 s, with zero failed requests under load."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from maas.registry import Registry
from maas.testing.models import make_multi_io_model
from maas.testing.server import RemoteServer

pytestmark = pytest.mark.slow

SCALES = {1: 10.0, 2: 20.0, 3: 30.0}


class Load:
    """Client threads sending requests back to back, recording (time, served version, computed scale)."""

    def __init__(self, address: str, threads: int = 4) -> None:
        self.address = address
        self.stop = threading.Event()
        self.results: list[tuple[float, int, float]] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = httpclient.InferenceServerClient(self.address)
        x = np.ones((4, 4), np.float32)
        feeds = {"x": x, "ids": np.zeros((4, 3), np.int64), "mask": np.zeros((4, 3), bool)}
        inputs = []
        for name, arr, dt in [("x", x, "FP32"), ("ids", feeds["ids"], "INT64"), ("mask", feeds["mask"], "BOOL")]:
            inp = httpclient.InferInput(name, list(arr.shape), dt)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        while not self.stop.is_set():
            try:
                r = client.infer("swap", inputs, outputs=[httpclient.InferRequestedOutput("y")])
                version = int(r.get_response()["model_version"])
                scale = float(r.as_numpy("y")[0, 0]) - 1.0  # y = x * scale + 1 with x = 1
                with self.lock:
                    self.results.append((time.monotonic(), version, scale))
            except Exception as exc:
                with self.lock:
                    self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)

    def first_time_serving(self, version: int, after: float) -> float | None:
        with self.lock:
            times = [t for t, v, _ in self.results if v == version and t >= after]
        return min(times) if times else None


def _cli(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "maas", "models", *args], env=env, check=True, capture_output=True)


def _wait_for(load: Load, version: int, since: float, limit_s: float = 5.0) -> float:
    deadline = since + limit_s
    while time.monotonic() < deadline:
        t = load.first_time_serving(version, since)
        if t is not None:
            return t - since
        time.sleep(0.02)
    raise AssertionError(f"version {version} not served within {limit_s}s")


def test_alias_moves_and_rollback_swap_without_failures(home: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    reg = Registry()
    for v, scale in SCALES.items():
        reg.register(make_multi_io_model(tmp_path / f"v{v}.onnx", scale=scale), "swap")
    reg.set_alias("swap", "production", 1)
    with RemoteServer(home) as server, Load(server.address) as load:
        time.sleep(0.5)
        delays = {}
        for step, (args, want) in enumerate(
            [
                (("alias", "set", "swap", "production", "2"), 2),
                (("alias", "set", "swap", "production", "3"), 3),
                (("rollback", "swap"), 2),
                (("rollback", "swap", "--alias", "production"), 1),
            ]
        ):
            _cli(cli_env, *args)  # another process moves the alias
            moved = time.monotonic()
            delays[step] = _wait_for(load, want, moved)
            time.sleep(0.3)
        time.sleep(0.3)
    assert not load.failures, load.failures[:5]
    assert len(load.results) > 100
    # Every response names the version that computed it.
    for _, version, scale in load.results:
        assert scale == pytest.approx(SCALES[version])
    # The CLI process returns after its commit; the swap must follow within 2 s.
    assert max(delays.values()) < 2.0, delays
    # Once a move is seen, the old version does not come back (no flapping).
    last = load.results[-20:]
    assert {v for _, v, _ in last} == {1}
