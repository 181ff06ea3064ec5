"""HTTP routes of the OpenAI-compatible API (``/v1/...``), so the ``openai`` client works unmodified; module-level
handlers over the serving context in ``app.state.ctx``. Bodies are read and checked here (JSON only, within
MAAS_MAX_JSON_BYTES) and parsed by :mod:`.protocol`; the work is in :mod:`.service` and :mod:`.embeddings`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response

from maas.errors import PayloadTooLarge, UnsupportedMediaType
from maas.serving.api.openai import embeddings, protocol, responses, service, streaming
from maas.serving.api.openai.models import ModelDirectory
from maas.serving.api.openai.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from maas.serving.context import ServingContext
from maas.serving.errors import request_id

Body = TypeVar("Body", bound=protocol.RequestBody)
T = TypeVar("T")


def _ctx(request: Request) -> ServingContext:
    ctx: ServingContext = request.app.state.ctx
    return ctx


def _directory(request: Request) -> ModelDirectory:
    """The app's :class:`ModelDirectory` (its alias cache lives as long as the app)."""
    state = request.app.state
    directory: ModelDirectory | None = getattr(state, "openai_models", None)
    if directory is None:
        directory = state.openai_models = ModelDirectory(_ctx(request))
    return directory


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


async def _parse(request: Request, cls: type[Body]) -> Body:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), not {media[:100]!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted here; send the body as is")
    body = await request.body()
    limit = _ctx(request).engine.limits.max_json_bytes
    if len(body) > limit:
        raise PayloadTooLarge(
            f"the request body is {len(body):,} bytes, over the limit of {limit:,} bytes for JSON (MAAS_MAX_JSON_BYTES)"
        )
    return protocol.parse(cls, body)


async def list_models(request: Request) -> Response:
    return _json({"object": "list", "data": await _directory(request).listing()})


async def get_model(request: Request, model: str) -> Response:
    return _json(await _directory(request).describe(model))


async def chat_completions(request: Request) -> Response:
    req = await _parse(request, ChatRequest)
    return await _generate(request, req, chat=True)


async def completions(request: Request) -> Response:
    req = await _parse(request, CompletionRequest)
    return await _generate(request, req, chat=False)


async def create_embeddings(request: Request) -> Response:
    req = await _parse(request, EmbeddingRequest)
    return _json(await embeddings.embed(_ctx(request), _directory(request), req))


async def _generate(request: Request, req: ChatRequest | CompletionRequest, *, chat: bool) -> Response:
    job = await service.prepare(_ctx(request), _directory(request), req, request_id(request))
    job.submit()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = streaming.events(job, chat=chat, include_usage=include_usage)
        return streaming.EventStream(body, on_close=job.cancel)
    try:
        choices = await _unless_disconnected(request, service.collect(job))
    finally:
        job.cancel()
    if choices is None:
        return Response(status_code=499)  # nobody is there to read it
    return _json(responses.chat_response(job, choices) if chat else responses.completion_response(job, choices))


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """The result of ``work``, or None once the client has disconnected (then ``work`` is cancelled): a request
    nobody waits for does not keep generating."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible API"])
    router.add_api_route("/models", list_models, methods=["GET"])
    router.add_api_route("/models/{model:path}", get_model, methods=["GET"])
    router.add_api_route(
        "/chat/completions", chat_completions, methods=["POST"], openapi_extra=protocol.openapi_body(ChatRequest)
    )
    router.add_api_route(
        "/completions", completions, methods=["POST"], openapi_extra=protocol.openapi_body(CompletionRequest)
    )
    router.add_api_route(
        "/embeddings", create_embeddings, methods=["POST"], openapi_extra=protocol.openapi_body(EmbeddingRequest)
    )
    return router
