"""The server's app factory: the model manager, the API families, error mapping, limits and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas import __version__
from maas.errors import MaasError, PayloadTooLarge
from maas.registry import Registry
from maas.serving.api.v2.router import build_router
from maas.serving.api.v2.service import V2Service
from maas.serving.manager import ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length up front or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_error(send, 413, self._message(int(value)))
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self._message(seen))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return (
            f"request body of {size:,} bytes is over the limit of {self.limit:,} bytes; send smaller batches "
            "or raise MAAS_MAX_REQUEST_BYTES on the server"
        )


async def _send_error(send: Send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: ServerSettings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the server. The registry is opened here unless given; models load in the background."""
    settings = settings or ServerSettings.from_env()
    registry = registry or Registry()
    metrics = ServerMetrics()
    manager = ModelManager(
        registry,
        models=settings.models,
        device=settings.device,
        watch_interval_s=settings.watch_interval_s,
        metrics=metrics,
    )
    executor = ThreadPoolExecutor(max_workers=settings.infer_threads, thread_name_prefix="maas-infer")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            manager.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="maas", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.v2 = V2Service(manager, metrics, executor, settings.load_wait_s)
    app.include_router(build_router())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(MaasError)
    async def maas_error(_: Request, exc: MaasError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.http_status == 503 else None
        return _error(exc.http_status, str(exc), headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app


def app_from_env() -> Any:
    """uvicorn factory (``uvicorn --factory maas.serving.app:app_from_env``)."""
    return create_app()
