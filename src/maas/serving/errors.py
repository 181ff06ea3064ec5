"""Errors as clients see them: the one place the server renders an exception into a response.

A :class:`~maas.errors.MaasError` becomes ``{"error": message}`` with its HTTP status; 429 and 503 carry
``Retry-After``; 408 and 413 close the connection (the rest of the request may still be on its way).
Anything else is a bug: it is logged with the request id and answered 500 with only that id, never the
exception's text, which may hold server paths or internals.
"""

from __future__ import annotations

import logging
import re

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from maas.errors import MaasError

log = logging.getLogger(__name__)

#: Absolute Windows (``C:\\...``) or POSIX (``/a/b``) paths inside a message; ``models:/NAME/1`` is no path.
_PATH = re.compile(r"(?<![\w])[A-Za-z]:(?:[\\/][\w.@+~-]+)+[\\/]?|(?<![\w:./])(?:/[\w.@+~-]+){2,}/?")
_MAX_MESSAGE = 600


def public_message(text: str) -> str:
    """``text`` fit for a client: absolute paths replaced by ``<path>``, one paragraph, bounded length. Cut before
    anything else, so a message quoting a client's 8 MB string costs microseconds."""
    text = _PATH.sub("<path>", text[: 4 * _MAX_MESSAGE]).strip()
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def request_id(request: Request) -> str:
    rid = request.scope.get("maas.request_id")
    return rid if isinstance(rid, str) else "-"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=error_headers(status, headers))


def error_headers(status: int, headers: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", "1")
    if status in (408, 413):
        headers["Connection"] = "close"
    return headers


def render(exc: BaseException, rid: str, where: str) -> tuple[int, dict[str, str], bytes]:
    """``exc`` as a REST answer: status, headers and the ``{"error"}`` body. ``where`` (method and path) goes to the
    log of an unexpected error, never to the client."""
    if isinstance(exc, MaasError) and not (exc.http_status >= 500 and type(exc) is MaasError):
        status, message = exc.http_status, public_message(str(exc))
    else:
        log.error("request %s (%s) failed", rid, where, exc_info=exc)
        status, message = 500, f"internal server error; the server's log has the details under request id {rid}"
    headers = error_headers(status, {"Content-Type": "application/json"})
    return status, headers, orjson.dumps({"error": message})


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(MaasError)
    async def maas_error(request: Request, exc: MaasError) -> JSONResponse:
        if exc.http_status >= 500 and type(exc) is MaasError:
            return _internal(request, exc)
        return error_response(exc.http_status, public_message(str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, public_message(str(exc.detail)), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]
        )
        return error_response(400, public_message(f"invalid request: {problems}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)


def _internal(request: Request, exc: BaseException) -> JSONResponse:
    rid = request_id(request)
    log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
    return error_response(
        500, f"internal server error; the server's log has the details under request id {rid}", {"X-Request-ID": rid}
    )
