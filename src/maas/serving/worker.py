"""One worker process of ``maas serve --workers N``: a full server (its own event loop, model manager and loaded
models) on the shared HTTP and gRPC ports, started and watched by :mod:`maas.serving.workers`.

Run as ``python -m maas.serving.worker`` with its :class:`WorkerSpec` as JSON on stdin. Besides the shared port
it serves the app on a private Unix socket, where its supervisor (and only it) asks whether it is ready. A
worker that replaces a dead one joins the shared port only once its models are loaded, so no request waits
for a load while the other workers are there to answer it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.serving import listen
from maas.serving.connections import uvicorn_options
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)

#: The response header naming the worker (its index, 0..N-1, kept across restarts) that answered.
WORKER_HEADER = b"x-maas-worker"
#: uvicorn's exit code when the server could not start (uvicorn.main.STARTUP_FAILURE).
STARTUP_FAILURE = 3
_PR_SET_PDEATHSIG = 1


class WorkerSpec(BaseModel):
    """What the supervisor tells a worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: ServerSettings  # the ports are the resolved ones (never 0)
    index: int
    supervisor_pid: int
    control_path: str  # the private Unix socket
    join_when_ready: bool  # False: listen on the shared port at once; True: once /v2/health/ready says so
    log_level: str = "info"


def server_options(settings: ServerSettings, log_level: str) -> dict[str, Any]:
    """uvicorn's options for one server process (single or worker): connection bounds, keep-alive, shutdown, TLS."""
    return {
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
        **uvicorn_options(settings),
    }


def tag_responses(app: ASGIApp, value: str, name: bytes = WORKER_HEADER) -> ASGIApp:
    """``app`` with the header ``name: value`` (by default :data:`WORKER_HEADER`) on every HTTP response."""
    tag = (name, value.encode())

    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), tag]}
            await send(message)

        await app(scope, receive, send_tagged)

    return tagged


def die_with(supervisor_pid: int) -> None:
    """Stop (SIGTERM: gracefully) when the supervisor dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: watch the parent instead

        def watch() -> None:
            while os.getppid() == supervisor_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="maas-parent-watch", daemon=True).start()
    if os.getppid() != supervisor_pid:  # it died before the line above took effect
        raise SystemExit(f"the supervisor (pid {supervisor_pid}) is gone; not starting")


class WorkerServer(uvicorn.Server):
    """uvicorn's server on the private control socket, joining the shared port (at once, or once ready when told
    to), and never stopping abruptly on its own. The shared port speaks TLS when configured; the control socket,
    which only the supervisor reaches, never does."""

    def __init__(self, config: uvicorn.Config, spec: WorkerSpec, shared: list[socket.socket]) -> None:
        super().__init__(config)
        self.spec = spec
        self.shared = shared  # the shared port's sockets, to listen on
        self._joining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl-C reaches the supervisor and its workers alike, then the supervisor sends SIGTERM: neither signal
        # forces an abrupt exit here (the supervisor kills a worker that takes too long), nor is re-raised later.
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        tls, self.config.ssl = self.config.ssl, None  # uvicorn would wrap every socket it is given
        try:
            await super().startup(sockets=sockets)
        finally:
            self.config.ssl = tls
        if not self.spec.join_when_ready:
            await self._join()
        elif self.shared:
            self._joining = asyncio.create_task(self._join_when_ready())

    async def _join_when_ready(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.should_exit:
            status = await loop.run_in_executor(None, listen.probe, self.spec.control_path, "/v2/health/ready", 1.0)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        else:
            return
        await self._join()
        log.info("worker %d (pid %d) ready; joined port %d", self.spec.index, os.getpid(), self.spec.settings.port)

    async def _join(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.shared:
            server = await loop.create_server(
                self._protocol, sock=sock, ssl=self.config.ssl, backlog=self.config.backlog
            )
            self.servers.append(server)

    def _protocol(self, _loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
        # The factory uvicorn's own startup() builds for the sockets it is given.
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
        )


def run_worker(spec: WorkerSpec) -> int:
    """Serve until SIGINT or SIGTERM; the exit code (:data:`STARTUP_FAILURE` when the server never started)."""
    from maas.serving.app import create_app

    die_with(spec.supervisor_pid)
    settings = spec.settings
    shared = listen.shared_sockets(settings.host, settings.port)
    control = listen.control_socket(spec.control_path)
    try:
        config = uvicorn.Config(
            tag_responses(create_app(settings), str(spec.index)), **server_options(settings, spec.log_level)
        )
        server = WorkerServer(config, spec, shared)
        server.run(sockets=[control])
    finally:
        for sock in [control, *shared]:
            sock.close()
    return 0 if server.started else STARTUP_FAILURE


def main() -> None:
    # Ctrl-C reaches the whole process group; the supervisor turns it into SIGTERM for its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = WorkerSpec.model_validate_json(sys.stdin.read())
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s %(name)s [worker {spec.index}]: %(message)s")
    logging.getLogger("maas").setLevel(spec.log_level.upper())
    sys.exit(run_worker(spec))


if __name__ == "__main__":
    main()
