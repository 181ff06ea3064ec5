"""ASGI middleware that bounds what one request may hold: its body's size, the time it takes to arrive,
and the bytes all requests in flight hold together. It also gives every request an id, sent back as
``X-Request-ID`` and written in the server's log beside any error."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.errors import PayloadTooLarge, RequestTimeout, Unavailable
from maas.serving.budget import InflightBytes

log = logging.getLogger(__name__)

#: A client's own X-Request-ID is kept when it looks like an id (so logs can be joined), else replaced.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestGuard:
    """See the module docstring. Errors raised from ``receive`` reach the app's exception handlers."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout_s: float, inflight: InflightBytes) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        #: Request bytes held in flight by the whole process (gRPC messages too).
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope["maas.request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_error(send_with_id, PayloadTooLarge(self._too_large(declared)))
            return
        if declared is not None and not self.inflight.fits(declared):
            await _send_error(send_with_id, Unavailable(self._busy()))
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        held = 0
        complete = False

        async def guarded() -> Message:
            nonlocal held, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # a timer, not a task as wait_for makes
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s (MAAS_BODY_TIMEOUT_S)"
                ) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                held += size
                self.inflight.take(size)
                complete = not message.get("more_body", False)
                if held > self.max_body_bytes:
                    raise PayloadTooLarge(self._too_large(held))
                if self.inflight.held > self.inflight.limit:
                    raise Unavailable(self._busy())
            else:
                complete = True
            return message

        def release_body() -> None:
            """Give back the body's bytes now: a handler that wrote them to disk holds them no longer (an upload
            whose registration takes minutes must not starve inference of the budget meanwhile)."""
            nonlocal held
            self.inflight.give(held)
            held = 0

        scope["maas.release_body"] = release_body
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start" and not started:
                started = True
                # The answer is ready to go: the body was read and used. A response that takes long to deliver (a
                # stream, or a client reading slowly) must not keep the body's bytes counted.
                self.inflight.give(held)
                held = 0
            await send_with_id(message)

        try:
            await self.app(scope, guarded, send_tracked)
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException:
            # What got past every handler (a Rust extension's panic is a BaseException): a JSON 500 naming the
            # request id, never the server's plain-text one.
            log.exception("request %s failed past the error handlers", rid)
            if not started:
                await _send_json(
                    send_with_id,
                    500,
                    f"internal server error; the server's log has the details under request id {rid}",
                    [],
                )
        finally:
            self.inflight.give(held)

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size:,} bytes is over the limit of {self.max_body_bytes:,} bytes; send smaller "
            "batches or raise MAAS_MAX_REQUEST_BYTES on the server"
        )

    def _busy(self) -> str:
        return self.inflight.busy_message()


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            text: str = bytes(value).decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                return text
    return secrets.token_hex(16)  # unpredictable: a client cannot take the id of a later request


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else None
    return None


async def _send_error(send: Send, exc: PayloadTooLarge | Unavailable) -> None:
    extra = [(b"retry-after", b"1") if exc.http_status == 503 else (b"connection", b"close")]
    await _send_json(send, exc.http_status, str(exc), extra)


async def _send_json(send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
