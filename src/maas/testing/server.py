"""A real ``maas serve`` in a subprocess on a free loopback port, for tests (ours and users')."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from maas.testing import processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of metric ``name`` in a Prometheus scrape ``text`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class RemoteServer:
    """Start ``maas serve`` with ``MAAS_HOME=home``; wait until ``/v2/health/ready`` answers 200.

    Use as a context manager. ``url`` is the HTTP base URL; ``address`` is ``host:port`` for tritonclient.
    """

    def __init__(
        self,
        home: Path,
        *,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 90.0,
        wait_ready: bool = True,
    ) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        #: The gRPC endpoint (``host:port`` for tritonclient.grpc).
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.args = args or []
        self.env = {**os.environ, "MAAS_HOME": str(self.home), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.wait_ready = wait_ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="maas-serve-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> RemoteServer:
        cmd = [
            sys.executable,
            "-m",
            "maas",
            "serve",
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            *self.args,
        ]
        # Its own session, killed at interpreter exit at the latest: a failed or timed-out test leaves no server.
        self.proc = processes.popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        path = "/v2/health/ready" if self.wait_ready else "/v2/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"maas serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"maas serve was not ready within {self.ready_timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            processes.kill_group(self.proc)
        self._log.close()

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
