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

#: Bodies up to this size are parsed on the event loop; larger ones (a long token-id prompt: millions of ints) in a
#: thread.
INLINE_BYTES = 256 * 1024


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
    return _response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


def _response(body: bytes) -> Response:
    return Response(body, media_type="application/json")


async def _parse(request: Request, cls: type[Body]) -> Body:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), not {media[:100]!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted here; send the body as is")
    body = await _body(request, _ctx(request).engine.limits.max_json_bytes)
    if len(body) <= INLINE_BYTES:
        return protocol.parse(cls, body)
    return await asyncio.to_thread(protocol.parse, cls, body)


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused as soon as it is known to be over ``limit`` bytes (by its Content-Length, or
    once that much has arrived): the rest is never read."""

    def too_large(size: int | None) -> PayloadTooLarge:
        was = f"is {size:,} bytes, over" if size is not None else "goes over"
        return PayloadTooLarge(f"the request body {was} the limit of {limit:,} bytes for JSON (MAAS_MAX_JSON_BYTES)")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(None)
        chunks.append(chunk)
    return b"".join(chunks)


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
    if job.logprobs is None:
        return _response(responses.response_body(job, choices, chat=chat))
    # Log-probabilities make the answer up to ~100 MB (a token's text per alternative): built off the event loop.
    return _response(await asyncio.to_thread(responses.response_body, job, choices, chat=chat))


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
