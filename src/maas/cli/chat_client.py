"""A small client of a server's OpenAI-compatible chat API (``POST /v1/chat/completions`` with ``stream: true``),
on the standard library's ``http.client``: the CLI has no HTTP client among its dependencies, and this needs only
one request and server-sent events.

Failures are :class:`~maas.errors.MaasError`\\ s with a message for the user: the server not reachable (naming the
URL and ``maas serve``), or the server's own error message with its status.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Generator, Iterator
from typing import Any

from maas.cli.connection import reason, tls_context
from maas.errors import InvalidInput, MaasError, NotFound, RateLimited, Unauthorized, Unavailable

#: Seconds a request waits for the socket (connecting, then between two reads of a stream).
TIMEOUT_S = 300.0
#: How long a request is retried while the server answers 503 or 429 with ``Retry-After`` (a model loading).
RETRY_FOR_S = 120.0

_BY_STATUS: dict[int, type[MaasError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    429: RateLimited,
    503: Unavailable,
}


class Unreachable(Unavailable):
    """No server answers at the URL."""


def base_url(url: str) -> urllib.parse.SplitResult:
    """``url`` checked, without a trailing ``/v1`` (both ``http://host:8000`` and OpenAI's base URL form work)."""
    parts = urllib.parse.urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"--url {url!r} is not an http(s) URL; give one like http://127.0.0.1:8000")
    path = parts.path.rstrip("/").removesuffix("/v1")
    return parts._replace(path=path)


class ChatClient:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.url = base_url(url)
        self.timeout = timeout
        self.headers = {"Accept": "text/event-stream, application/json", "User-Agent": "maas-chat"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @property
    def shown(self) -> str:
        return urllib.parse.urlunsplit(self.url)

    def _connection(self) -> http.client.HTTPConnection:
        port = self.url.port
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(
                self.url.hostname or "", port, timeout=self.timeout, context=tls_context()
            )
        return http.client.HTTPConnection(self.url.hostname or "", port, timeout=self.timeout)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """(connection, response) with a 2xx status: errors raised, 503 and 429 with ``Retry-After`` retried."""
        payload = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        give_up = time.monotonic() + RETRY_FOR_S
        while True:
            conn = self._connection()
            try:
                conn.request(method, self.url.path + path, body=payload, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise Unreachable(
                    f"cannot reach a maas server at {self.shown} ({reason(exc)}); start one with `maas serve`"
                    " (or point --url at it)"
                ) from None
            if response.status < 300:
                return conn, response
            raw = response.read(1 << 16)
            conn.close()
            wait = _retry_after(response.getheader("Retry-After"))
            if response.status in (429, 503) and wait is not None and time.monotonic() + wait < give_up:
                time.sleep(wait)
                continue
            message = _error_message(raw) or response.reason or "no message"
            cls = _BY_STATUS.get(response.status, MaasError)
            raise cls(f"the server answered {response.status}: {message}")

    def model(self, name: str) -> dict[str, Any]:
        """The model's entry (``GET /v1/models/NAME``): raises if the server does not serve it."""
        conn, response = self._send("GET", f"/v1/models/{urllib.parse.quote(name, safe='/@')}")
        try:
            data: dict[str, Any] = json.loads(response.read())
            return data
        finally:
            conn.close()

    def stream(self, body: dict[str, Any]) -> Generator[str, None, None]:
        """The answer's text as it arrives, piece by piece. Closing the iterator closes the connection, which stops
        the generation on the server."""
        conn, response = self._send("POST", "/v1/chat/completions", {**body, "stream": True})
        try:
            yield from _deltas(response)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"the connection to {self.shown} broke during the answer ({reason(exc)})") from None
        finally:
            conn.close()


def _deltas(response: http.client.HTTPResponse) -> Iterator[str]:
    """The content of each chunk of a server-sent event stream, until ``data: [DONE]``."""
    while True:
        line = response.readline()
        if not line:
            raise Unavailable("the server ended the answer early (no `data: [DONE]`); it may have stopped")
        text = line.decode("utf-8").strip()
        if not text.startswith("data:"):
            continue  # blank lines between events, comments, other fields
        data = text[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise MaasError(f"the server sent an event that is not JSON: {data[:200]!r}") from None
        if "error" in event:
            raise MaasError(f"the server stopped the answer: {_error_text(event['error'])}")
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:500]
    return _error_text(body.get("error", body) if isinstance(body, dict) else body)


def _error_text(error: Any) -> str:
    """The message of OpenAI's ``{"message": ...}`` or maas' plain string."""
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.1), 5.0) if value is not None else None
    except ValueError:
        return None
