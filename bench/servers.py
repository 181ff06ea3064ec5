"""The servers the serving benchmark times, as subprocesses on free loopback ports.

Each runs in its own process group and is a context manager: leaving the block (normally, on an error, on
Ctrl-C) stops it with SIGINT, then kills its whole group; ``maas.testing.processes`` also kills whatever is
left when Python exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from maas.testing import processes
from maas.testing.server import free_port

HERE = Path(__file__).resolve().parent


def maas_cli(*args: str, home: Path, timeout: float = 120, wide: bool = False) -> subprocess.CompletedProcess[str]:
    """``maas ARGS`` with ``MAAS_HOME=home``, run as the user runs it (``wide``: in a 200-column terminal)."""
    env = {**os.environ, "MAAS_HOME": str(home), **({"COLUMNS": "200"} if wide else {})}
    return processes.run([sys.executable, "-m", "maas", *args], timeout=timeout, text=True, env=env)


def cli_has_command(name: str, *, home: Path) -> bool:
    """Whether the installed CLI has ``maas NAME`` (its ``--help`` exits 0)."""
    return maas_cli(name, "--help", home=home, timeout=60).returncode == 0


def cli_options(command: str, *, home: Path) -> set[str]:
    """The long options ``maas COMMAND --help`` lists."""
    proc = maas_cli(command, "--help", home=home, timeout=60, wide=True)
    return set(re.findall(r"--[a-z][a-z0-9-]*", re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)))


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    grpc_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_address(self) -> str | None:
        return None if self.grpc_port is None else f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/v2/health/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{server.name} was not ready within {timeout_s:g} s:\n{server.log_tail()}")


@contextlib.contextmanager
def _serving(
    name: str, cmd: list[str], port: int, env: dict[str, str], grpc_port: int | None = None
) -> Iterator[Server]:
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = processes.popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    server = Server(name, proc, port, log_path, grpc_port)
    try:
        _wait_ready(server, timeout_s=120)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        processes.kill_group(proc)
        log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def maas_server(home: Path, *, grpc: bool, workers: int = 1) -> Iterator[Server]:
    """``maas serve --port P [--grpc-port G] [--workers N]`` on ``home``'s registry, ready to answer."""
    port = free_port()
    cmd = [sys.executable, "-m", "maas", "serve", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    grpc_port = free_port() if grpc else None
    if grpc_port is not None:
        cmd += ["--grpc-port", str(grpc_port)]
    env = {**os.environ, "MAAS_HOME": str(home), "MAAS_DEVICE": "cpu"}
    with _serving("maas serve", cmd, port, env, grpc_port) as server:
        yield server


@contextlib.contextmanager
def naive_server(model: Path, name: str) -> Iterator[Server]:
    """``bench/naive_server.py`` under uvicorn, serving ``model`` as ``name``."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "naive_server.py"), str(model), "--name", name, "--port", str(port)]
    with _serving("naive FastAPI", cmd, port, dict(os.environ)) as server:
        yield server
