"""Server-sent events for ``stream: true``: ``data: {chunk}`` per chunk, ``data: [DONE]`` last.

Chat streams start with each choice's role, then its content as it is generated, then a chunk with its
``finish_reason``; choices interleave, each chunk naming its ``index``. With ``stream_options.include_usage`` one
more chunk, with no choices and the request's usage, comes before ``[DONE]``. An error after the response has
started is sent as an event in OpenAI's error shape (then ``[DONE]``). Whenever the stream ends (finished, failed,
or the client gone) every generation of the request is cancelled at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from maas.serving import errors
from maas.serving.api.openai.responses import Chunks
from maas.serving.api.openai.service import Job, pieces

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def events(job: Job, *, chat: bool, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The events of a submitted ``job``."""
    chunks = Chunks(job, chat=chat, include_usage=include_usage)
    try:
        if chat:
            for chunk in chunks.roles():
                yield sse(chunk)
        async with contextlib.aclosing(pieces(job)) as stream:
            async for piece in stream:
                if piece.text or piece.tokens:
                    yield sse(chunks.content(piece))
                if piece.finish_reason is not None:
                    yield sse(chunks.finish(piece))
        if include_usage:
            yield sse(chunks.usage())
    except Exception as exc:  # the 200 has gone out: the error goes as an event
        _, body = errors.openai_exception(exc, job.request_id, "a stream")
        yield sse(body)
    yield DONE


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that calls ``on_close`` when it ends, however it ends: finished, the send
    failing, or cancelled because the client disconnected (Starlette cancels the stream then; an async generator
    suspended at ``yield`` would otherwise run its cleanup only when garbage-collected)."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=HEADERS)
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
