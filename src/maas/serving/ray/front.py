"""The front door of ``maas serve --engine ray``: an ASGI app, served by uvicorn in the ``maas serve`` process, that
reads each request whole and forwards it to a replica through a Ray Serve deployment handle.

The body is bounded here (``MAAS_MAX_REQUEST_BYTES``, ``MAAS_BODY_TIMEOUT_S``, ``MAAS_MAX_INFLIGHT_BYTES``) and sent
with the client's address, so the replica's own guards, access checks and audit see the real request. A replica
that dies before its answer starts is replaced by another for a request safe to repeat (see
:mod:`maas.serving.ray.retry`); one that dies mid-answer cuts the connection, the only way left to tell the client.
Every failure of the front itself is a JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from maas.errors import MaasError
from maas.serving.access.gate import send_error
from maas.serving.budget import InflightBytes
from maas.serving.ray.doorman import Doorman
from maas.serving.ray.forwarded import ForwardedRequest
from maas.serving.ray.retry import Retries, replica_crashed, replica_died, retry_safe
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)


class Answered(Exception):
    """The front answered the request itself (an error); nothing is forwarded."""


class Front:
    """``handle``: the deployment's handle; its ``forward`` method streams a :class:`Head` then ``Chunk`` parts."""

    def __init__(
        self,
        handle: Any,
        settings: ServerSettings,
        retries: Callable[[], Retries] = Retries,
        doorman: Doorman | None = None,
    ) -> None:
        self._handle = handle.options(stream=True)
        self._doorman = doorman or Doorman(settings)
        self._max_body = settings.max_request_bytes
        self._body_timeout_s = settings.body_timeout_s
        self._inflight = InflightBytes(settings.max_inflight_bytes)
        self._retries = retries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        held = 0
        try:
            try:
                await self._doorman.http(scope)  # as the plain server: no body read for a stranger
            except MaasError as exc:
                await send_error(send, exc)
                return
            try:
                body = await self._read_body(scope, receive, send)
            except Answered:
                return
            held = len(body)

            def release() -> None:  # the answer has started: the body was used
                nonlocal held
                self._inflight.give(held)
                held = 0

            request = ForwardedRequest.of(scope, body)
            del body
            relay = asyncio.ensure_future(self._relay(request, send, release))
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not relay.done():  # the client went away, or this task was cancelled (shutdown)
                    relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        except Exception:  # a bug here: still a JSON answer if none started, never uvicorn's plain-text 500
            log.exception("the front failed on %s %s", scope.get("method"), scope.get("path"))
            with contextlib.suppress(Exception):
                await _json(send, 502, "the front of the Ray deployment failed; its log has the details")
        finally:
            self._inflight.give(held)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes:
        declared = _content_length(scope)
        if declared is not None and declared > self._max_body:
            await _json(send, 413, self._too_large(declared), close=True)
            raise Answered
        if declared is not None and not self._inflight.fits(declared):
            await _json(send, 503, self._inflight.busy_message(), retry_after=True)
            raise Answered
        parts: list[bytes] = []
        size = 0  # taken from the budget; given back by the caller once the body is returned
        try:
            async with asyncio.timeout(self._body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Answered  # nobody to answer
                    chunk = message.get("body", b"")
                    parts.append(chunk)
                    size += len(chunk)
                    self._inflight.take(len(chunk))
                    if size > self._max_body:
                        await _json(send, 413, self._too_large(size), close=True)
                        raise Answered
                    if self._inflight.held > self._inflight.limit:
                        await _json(send, 503, self._inflight.busy_message(), retry_after=True)
                        raise Answered
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except BaseException as exc:
            self._inflight.give(size)
            if not isinstance(exc, TimeoutError):
                raise
        late = f"the request body did not arrive within {self._body_timeout_s:g} s (MAAS_BODY_TIMEOUT_S)"
        await _json(send, 408, late, close=True)
        raise Answered

    async def _relay(self, request: ForwardedRequest, send: Send, release: Callable[[], None]) -> None:
        """Forward ``request``, retrying as :mod:`~maas.serving.ray.retry` allows, and send the answer on."""
        retries = self._retries()
        safe = retry_safe(request.method, request.path)
        while True:
            stream = self._handle.forward.remote(request)
            try:
                head = await stream.__anext__()
                break
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except StopAsyncIteration:
                await _json(send, 502, "the replica ended the call without an answer; retry the request")
                return
            except Exception as exc:
                stream.cancel()
                wait = retries.next_wait(crashed=replica_crashed(exc)) if safe and replica_died(exc) else None
                if wait is None:
                    await _json(send, *_failure(request, exc, safe, retries.made))
                    return
                what = type(exc).__name__
                log.warning("%s %s: the replica died (%s); trying another", request.method, request.path, what)
                await asyncio.sleep(wait)
        release()
        more = head.more
        try:
            await send({"type": "http.response.start", "status": head.status, "headers": list(head.headers)})
            await send({"type": "http.response.body", "body": head.body, "more_body": more})
            while more:
                chunk = await stream.__anext__()
                await send({"type": "http.response.body", "body": chunk.body, "more_body": chunk.more})
                more = chunk.more
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # the answer has started: closing the connection is the only signal left
            stream.cancel()
            log.warning("an answer was cut off: its replica failed mid-answer (%r); closing the connection", exc)

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size:,} bytes is over the limit of {self._max_body:,} bytes; send smaller "
            "batches or raise MAAS_MAX_REQUEST_BYTES on the server"
        )


def _failure(request: ForwardedRequest, exc: Exception, safe: bool, attempts: int) -> tuple[int, str]:
    """The status and message for a request no replica answered."""
    if not replica_died(exc):
        log.error("%s %s: the replica call failed", request.method, request.path, exc_info=exc)
        return 502, f"the replica failed to answer ({type(exc).__name__}); the server's log has the details"
    if not safe:
        return 502, (
            "the replica running this request died before answering; the request may or may not have taken "
            "effect: check (e.g. list the models) before sending it again"
        )
    return 503, f"the replicas died or were unavailable in {attempts} attempts; retry shortly"


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone away (the body has been read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else None
    return None


async def _json(send: Send, status: int, message: str, *, close: bool = False, retry_after: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
