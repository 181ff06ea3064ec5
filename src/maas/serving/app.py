"""The server's app factory: the serving context, the API families, error mapping, limits and metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

from maas import __version__
from maas.registry import Registry
from maas.serving import errors
from maas.serving.access.gate import AccessGate
from maas.serving.api.admin.router import build_router as build_admin_router
from maas.serving.api.openai.router import build_router as build_openai_router
from maas.serving.api.v2.infer import FastInfer
from maas.serving.api.v2.router import build_router
from maas.serving.context import ServingContext
from maas.serving.guard import RequestGuard
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: ServingContext = app.state.ctx
    await ctx.start()
    try:
        yield
    finally:
        await ctx.stop()


async def prometheus(request: Request) -> Response:
    metrics = request.app.state.ctx.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


class MaasApp(FastAPI):
    """FastAPI with maas's front door: every HTTP request passes the :class:`RequestGuard` (limits, request id) and
    the inference fast path (:class:`FastInfer`) before FastAPI's own middleware and routing, which the other
    routes still get."""

    def __init__(self, ctx: ServingContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.ctx = ctx
        settings = ctx.settings
        self._front = RequestGuard(
            AccessGate(FastInfer(super().__call__, ctx), ctx.access),
            max_body_bytes=settings.max_request_bytes,
            body_timeout_s=settings.body_timeout_s,
            inflight=ctx.inflight,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if errors.is_openai(scope["path"]):
                send = errors.openai_errors(send)  # the guard's own error answers, in OpenAI's shape
            await self._front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: ServerSettings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the server. The registry is opened here unless given; models load in the background."""
    ctx = ServingContext.build(settings or ServerSettings.from_env(), registry)
    app = MaasApp(ctx, title="maas", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.include_router(build_router())
    app.include_router(build_openai_router())
    app.include_router(build_admin_router())
    app.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    errors.install(app)
    return app


def app_from_env() -> Any:
    """uvicorn factory (``uvicorn --factory maas.serving.app:app_from_env``)."""
    return create_app()
