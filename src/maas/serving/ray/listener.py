"""uvicorn serving the :class:`~maas.serving.ray.front.Front` on ``--host``/``--port`` in a thread of the ``maas
serve`` process, with the connection bounds and TLS of every maas server (:func:`maas.serving.worker.server_options`).

The port's sockets are bound before Ray starts (a taken port fails at once) but listen only from :meth:`start` on,
once every replica runs: until then a client's connection is refused rather than left waiting.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from maas.serving.listen import claim_port, shared_sockets
from maas.serving.settings import ServerSettings
from maas.serving.worker import server_options

#: How long a started uvicorn has to stop (its own graceful shutdown is 5 s).
STOP_TIMEOUT_S = 15.0


class Listener:
    def __init__(self, settings: ServerSettings) -> None:
        port = claim_port(settings.host, settings.port, "HTTP", "--port")
        #: ``settings`` with the port resolved (``--port 0`` picks a free one).
        self.settings = settings.model_copy(update={"port": port})
        self._sockets = shared_sockets(settings.host, port)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: ASGIApp, *, timeout_s: float = 30.0) -> None:
        """Serve ``app`` from a thread; returns once it listens. Raises RuntimeError if uvicorn could not start."""
        level = logging.getLevelName(logging.getLogger("maas").getEffectiveLevel()).lower()
        options = server_options(self.settings, level)
        config = uvicorn.Config(app, lifespan="off", ws="none", **options)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, args=(self._sockets,), name="maas-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the front server did not start; the log above says why")
            self._thread.join(0.05)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop taking connections, let those open finish (5 s at most), and close the sockets."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        for sock in self._sockets:
            sock.close()
