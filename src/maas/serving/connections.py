"""Connection-level defences of ``maas serve``: what an ASGI app cannot see.

uvicorn's HTTP/1.1 protocol on httptools (llhttp, the parser Node.js uses: several times faster than h11) waits
forever for a request's headers, keeps any number of connections open and parses any number of pipelined
requests ahead. :func:`protocol_class` returns the same protocol with these bounds added:

- a cap on open connections: one over it is answered 503 with ``Retry-After`` and closed at once;
- a header deadline: from a connection's opening (or the first byte of its next request) the client has
  ``header_timeout_s`` to finish the request's headers, else 408 and the connection is closed, so
  half-sent headers (slowloris) and silent sockets cannot pile up;
- a body the app never read (an early answer such as 404 or 413) must finish arriving within the same
  time after the answer, else the connection is closed;
- a write deadline: a client that stops reading its responses (its socket full, our buffer over the
  high-water mark) for ``write_timeout_s`` has its connection dropped and the buffered response freed, so
  unread answers (pipelined requests never read, say) cannot hold memory or a connection slot for ever;
- a request head (request line and headers) of at most :data:`MAX_HEAD_BYTES`, else 431 and the connection is
  closed (llhttp itself has no bound, and uvicorn keeps every header line as Python objects);
- at most :data:`MAX_PIPELINED` requests parsed ahead of the one being answered; a client sending more is
  disconnected (each parsed request holds memory until its turn).

A request the HTTP parser cannot read is answered ``400`` with an ``{"error"}`` body, like every other error.

The body's own deadline, for bodies the app reads, is :class:`maas.serving.guard.RequestGuard`'s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Requests parsed ahead of the one being answered on one connection.
MAX_PIPELINED = 32
#: Bytes of a request's head (request line and headers); a longer head is answered 431 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024
#: Held writes are sent at once past this size.
COALESCE_BYTES = 64 * 1024


def _raw_response(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


class _CoalescingTransport:
    """The connection's transport, with the writes of one response joined into one send: uvicorn writes a
    response's head and body separately, two system calls and two TCP segments for a small answer. Writes are
    held until the response completes (:meth:`flush` from ``on_response_complete``) or, for a streamed answer, until
    the event loop's next turn, so nothing waits longer than that."""

    __slots__ = ("_flush_scheduled", "_loop", "_parts", "_size", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._parts: list[bytes] = []
        self._size = 0
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= COALESCE_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._parts:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._parts.clear()
        self._size = 0
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def protocol_class(
    *, max_connections: int, header_timeout_s: float, write_timeout_s: float = 30.0
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the bounds of the module docstring (``uvicorn.run(http=...)``)."""
    busy = _raw_response(
        503,
        "Service Unavailable",
        f"the server has {max_connections} connections open already (MAAS_MAX_CONNECTIONS); retry shortly",
        b"retry-after: 1\r\n",
    )
    too_big = _raw_response(
        431,
        "Request Header Fields Too Large",
        f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes; send fewer or shorter headers",
    )
    too_slow = _raw_response(
        408,
        "Request Timeout",
        f"the request's headers did not arrive within {header_timeout_s:g} s (MAAS_HEADER_TIMEOUT_S)",
    )

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _write_deadline: asyncio.TimerHandle | None = None
        _refused = False
        _in_head = True  # the bytes arriving belong to a request's head (not yet complete)
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                self.transport = transport
                transport.write(busy)
                transport.close()
                return
            super().connection_made(transport)
            self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._cancel_write_deadline()
            if self._refused:
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                self._head_bytes += len(data)  # may count a body's first bytes too: only ever early, never late
            super().data_received(data)
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.transport.write(too_big)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:
                self._arm()  # the first bytes of the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()  # headers complete; the body's deadline is the app's (RequestGuard)
            super().on_headers_complete()
            if len(self.pipeline) > MAX_PIPELINED:
                self.transport.abort()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0  # what follows is the next request's head
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete:
                self._disarm()  # the rest of an early-answered body has arrived

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]
            super().on_response_complete()
            cycle = self.cycle
            if not self.transport.is_closing() and cycle is not None and cycle.more_body and not self.pipeline:
                self._arm()  # answered before the body was read: it must still finish arriving

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(write_timeout_s, self._write_expired)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel_write_deadline()

        def _cancel_write_deadline(self) -> None:
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None

        def _write_expired(self) -> None:
            self._write_deadline = None
            self.transport.abort()  # close() would wait for the client to read what is buffered

        def send_400_response(self, msg: str) -> None:
            self.transport.write(
                _raw_response(400, "Bad Request", f"malformed HTTP request ({msg.rstrip('.')}); check its framing")
            )
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is None or (cycle.response_complete and not cycle.more_body):
                self.transport.write(too_slow)  # no answer under way: say why the connection closes
            self.transport.close()

    return GuardedHttpToolsProtocol


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply ``settings``' connection bounds."""
    return {
        "http": protocol_class(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            write_timeout_s=settings.write_timeout_s,
        ),
        "loop": "uvloop",
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }
