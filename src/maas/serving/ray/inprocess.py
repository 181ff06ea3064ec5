"""Run an ASGI app for one :class:`ForwardedRequest` in this process and give its answer as parts (the replica side
of the front; no Ray here).

The app gets the body in one message, then ``receive`` waits for the client's disconnect: it comes when the caller
stops the iteration (the front cancelled the call because its client went away), so a language-model stream
notices and frees its slot. The app then has :data:`DISCONNECT_GRACE_S` to return before it is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator

from starlette.types import ASGIApp, Message

from maas.serving.ray.forwarded import Chunk, ForwardedRequest, Head, scope_of

log = logging.getLogger(__name__)

#: How long an app whose client went away has to notice and return before its task is cancelled.
DISCONNECT_GRACE_S = 2.0
#: Body messages already queued are sent together up to this size (fewer, larger parts for a fast producer).
COALESCE_BYTES = 256 * 1024


class IncompleteResponse(RuntimeError):
    """The app returned (or failed) after starting its answer but before finishing it."""


async def answer(
    app: ASGIApp, request: ForwardedRequest, *, grace_s: float = DISCONNECT_GRACE_S
) -> AsyncGenerator[Head | Chunk, None]:
    """The app's answer to ``request``: a :class:`Head`, then :class:`Chunk` parts while ``more``. An app that
    returns without answering gives a JSON 500; one that stops mid-answer raises :class:`IncompleteResponse`."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()  # None: the app returned
    gone = asyncio.Event()
    body: list[bytes] = [request.body]

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if not gone.is_set():  # once the client is gone, dropped: what uvicorn does
            outbox.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope_of(request), receive, send)
        finally:
            outbox.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        start = await outbox.get()
        if start is None or start["type"] != "http.response.start":
            yield _failed(request, task)
            return
        headers = tuple((bytes(k), bytes(v)) for k, v in start.get("headers", ()))
        data, more = await _body(outbox)
        yield Head(int(start["status"]), headers, data, more)
        while more:
            data, more = await _body(outbox)
            yield Chunk(data, more)
    finally:
        gone.set()
        await _finish(task, grace_s)


async def _body(outbox: asyncio.Queue[Message | None]) -> tuple[bytes, bool]:
    """The next body bytes (every body message queued already, up to :data:`COALESCE_BYTES`) and whether more
    follow."""
    parts: list[bytes] = []
    size, more = 0, True
    while more and (not parts or (size < COALESCE_BYTES and not outbox.empty())):
        message = await outbox.get()
        if message is None:
            outbox.put_nowait(None)  # keep the end for a later call, after the bytes gathered so far
            if parts:
                break
            raise IncompleteResponse("the app returned before finishing its answer")
        if message["type"] != "http.response.body":
            continue  # trailers and other extensions were not offered in the scope
        chunk = bytes(message.get("body", b""))
        parts.append(chunk)
        size += len(chunk)
        more = bool(message.get("more_body", False))
    return b"".join(parts), more


def _failed(request: ForwardedRequest, task: asyncio.Task[None]) -> Head:
    exc = task.exception() if task.done() and not task.cancelled() else None
    log.error("%s %s: the app returned no answer", request.method, request.path, exc_info=exc)
    body = json.dumps({"error": "internal server error: the replica's app returned no answer"}).encode()
    headers = ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()))
    return Head(500, headers, body, more=False)


async def _finish(task: asyncio.Task[None], grace_s: float) -> None:
    """Wait up to ``grace_s`` for the app to return (it has been told the client is gone), then cancel it."""
    try:
        if not task.done():
            await asyncio.wait({task}, timeout=grace_s)
    finally:
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            log.debug("the app failed after answering", exc_info=task.exception())
