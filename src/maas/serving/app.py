"""The server's app factory: the model manager, the API families, error mapping, limits and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response

from maas import __version__
from maas.registry import Registry
from maas.serving import errors, memory
from maas.serving.api.v2.router import build_router
from maas.serving.api.v2.service import V2Service
from maas.serving.guard import RequestGuard
from maas.serving.manager import ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)


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
        memory.tune_allocator()
        memory.freeze_heap()
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
    app.state.v2 = V2Service(manager, metrics, executor, settings)
    app.include_router(build_router())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    errors.install(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_request_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_inflight_bytes=settings.max_inflight_bytes,
    )
    return app


def app_from_env() -> Any:
    """uvicorn factory (``uvicorn --factory maas.serving.app:app_from_env``)."""
    return create_app()
