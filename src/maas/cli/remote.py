"""The HTTP client of a server's admin API (``/admin/v1``), on the standard library's ``http.client`` (the CLI has
no HTTP client among its dependencies).

Every failure is a :class:`~maas.errors.MaasError` of the server's status (401, 403, 404, 409, 413, …) whose message
is the server's own and names the server, so ``maas`` prints it as one line, as it does a local error.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from maas.cli.connection import reason, tls_context
from maas.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    MaasError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)

T = TypeVar("T")

PREFIX = "/admin/v1"
#: Seconds a request waits for the socket: connecting, and the answer (registering inspects the whole model).
TIMEOUT_S = 600.0
_BLOCK = 1 << 20

_BY_STATUS: dict[int, type[MaasError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    503: Unavailable,
}


class Unreachable(Unavailable):
    """No server answers at the URL."""


class AdminClient:
    """Requests to ``url``'s admin API with ``Authorization: Bearer <api_key>``; answers as parsed JSON."""

    def __init__(self, url: str, api_key: str | None, *, timeout: float = TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(
                f"MAAS_SERVER_URL={url!r} is not an http(s) URL; set it like http://127.0.0.1:8000 (or unset it to "
                "act on the local registry)"
            )
        self.url = parts._replace(path=parts.path.rstrip("/"), query="", fragment="")
        self.api_key = api_key
        self.timeout = timeout

    @property
    def shown(self) -> str:
        return urllib.parse.urlunsplit(self.url)

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self.url.hostname or "", self.url.port
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=tls_context(), blocksize=_BLOCK
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout, blocksize=_BLOCK)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        upload: Path | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """``method`` on ``/admin/v1`` + ``path`` (segments already quoted: see :func:`quote`), with a JSON
        ``body`` or the file ``upload`` streamed as the body; the answer's JSON."""
        target = self.url.path + PREFIX + path
        if query:
            target += "?" + urllib.parse.urlencode(
                [(k, v) for k, v in query.items() if v is not None and not isinstance(v, list)]
                + [(k, item) for k, v in query.items() if isinstance(v, list) for item in v]
            )
        sent = {"Accept": "application/json", "User-Agent": "maas-cli", **(headers or {})}
        if self.api_key:
            sent["Authorization"] = f"Bearer {self.api_key}"
        conn = self._connection()
        try:
            try:
                if upload is not None:
                    sent["Content-Type"] = "application/octet-stream"
                    sent["Content-Length"] = str(upload.stat().st_size)
                    with upload.open("rb") as fh:
                        _send(conn, method, target, fh, sent)
                else:
                    payload = None if body is None else json.dumps(body).encode()
                    if payload is not None:
                        sent["Content-Type"] = "application/json"
                    _send(conn, method, target, payload, sent)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(
                    f"cannot reach the maas server at {self.shown} ({reason(exc)}); check MAAS_SERVER_URL, or unset "
                    "it to act on the local registry"
                ) from None
        finally:
            conn.close()
        if response.status >= 300:
            raise self._error(response.status, raw, response.reason)
        try:
            return json.loads(raw)
        except ValueError:
            raise MaasError(f"the server at {self.shown} answered with something that is not JSON") from None

    def _error(self, status: int, raw: bytes, reason: str) -> MaasError:
        try:
            data = json.loads(raw)
            message = str(data.get("error", data)) if isinstance(data, dict) else str(data)
        except ValueError:
            message = raw.decode("utf-8", "replace").strip()[:500] or reason or "no message"
        if status == 401 and not self.api_key:
            message += "; set MAAS_API_KEY to your key"
        cls = _BY_STATUS.get(status, MaasError)
        return cls(f"{message} (server {self.shown}, HTTP {status})")

    def decode(self, fn: Callable[[Any], T], data: Any) -> T:
        """``fn(data)``: an answer turned into an entity; a clear error when it is not the shape maas answers."""
        try:
            return fn(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MaasError(
                f"the server at {self.shown} answered in a shape this maas does not know; is it a maas server of "
                "the same version?"
            ) from None

    def decode_list(self, fn: Callable[[Any], T], data: Any, key: str) -> list[T]:
        """``fn`` of each item of the list ``data[key]``."""
        return self.decode(lambda d: [fn(item) for item in d[key]], data)


def quote(segment: str | int) -> str:
    """One path segment, quoted (names are validated on both sides; this only keeps the URL well formed)."""
    return urllib.parse.quote(str(segment), safe="")


def _send(conn: http.client.HTTPConnection, method: str, target: str, body: Any, headers: dict[str, str]) -> None:
    try:
        conn.request(method, target, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        # The server may have answered before taking the whole body (413: over its limit): read that answer.
        pass
