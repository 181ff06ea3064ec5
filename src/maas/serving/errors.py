"""Errors as clients see them: the one place the server renders an exception into a response.

A :class:`~maas.errors.MaasError` becomes ``{"error": message}`` with its HTTP status; under ``/v1/`` (the
OpenAI-compatible API) it becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}`` instead. 429 and 503
carry ``Retry-After``; 408 and 413 close the connection (the rest of the request may still be on its way).
Anything else is a bug: it is logged with the request id and answered 500 with only that id, never the
exception's text, which may hold server paths or internals.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Message, Send

from maas.errors import MaasError

log = logging.getLogger(__name__)

#: Absolute Windows (``C:\\...``) or POSIX (``/a/b``) paths inside a message; ``models:/NAME/1`` is no path, nor are
#: the server's own routes (``/v1/embeddings``, ``/v2/models/NAME/infer``), which messages name to show the fix.
_PATH = re.compile(
    r"(?<![\w])[A-Za-z]:(?:[\\/][\w.@+~-]+)+[\\/]?|(?<![\w:./])(?!/v1/(?:models|chat|completions|embeddings)\b|/v2/models/)(?:/[\w.@+~-]+){2,}/?"
)
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


# --- OpenAI's shape ---------------------------------------------------------------------------------------------------

#: The ``type`` OpenAI's errors carry, by HTTP status (5xx: ``server_error``).
OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    408: "timeout_error",
    429: "rate_limit_error",
}
#: The ``code`` of errors that set none of their own.
OPENAI_CODES = {413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable"}


def is_openai(path: str) -> bool:
    """Whether ``path`` belongs to the OpenAI-compatible API, whose errors have OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, Any]]:
    """OpenAI's error body: ``type`` from the status, ``param`` the request parameter at fault (if one is)."""
    kind = "server_error" if status >= 500 else OPENAI_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}}


def openai_exception(exc: BaseException, rid: str, where: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``exc`` as OpenAI's error body, with its status: a :class:`MaasError` says what it says (``param`` and
    ``code`` when it has them); anything else is logged and answered as a 500 naming only the request id."""
    if isinstance(exc, MaasError) and not (exc.http_status >= 500 and type(exc) is MaasError):
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return exc.http_status, openai_error(
            exc.http_status,
            public_message(str(exc)),
            param if isinstance(param, str) else None,
            code if isinstance(code, str) else None,
        )
    log.error("request %s (%s) failed", rid, where, exc_info=exc)
    return 500, openai_error(500, f"internal server error; the server's log has the details under request id {rid}")


def openai_response(
    status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        openai_error(status, message, param), status_code=status, headers=error_headers(status, headers)
    )


def openai_errors(send: Send) -> Send:
    """``send`` for a request under ``/v1/``: an error body in the plain ``{"error": message}`` shape (written by the
    request guard before any route runs: a body over the limit, the server busy) leaves in OpenAI's shape."""
    held: Message | None = None

    async def reshaped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held = message
            return
        if held is not None and message["type"] == "http.response.body":
            start, held = held, None
            body = message.get("body", b"")
            if not message.get("more_body", False):
                body = _reshape(start["status"], body)
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                message = {**message, "body": body}
            await send(start)
        await send(message)

    return reshaped


def _reshape(status: int, body: bytes) -> bytes:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return orjson.dumps(openai_error(status, parsed["error"]))
    return body


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
        if is_openai(request.url.path):
            status, body = openai_exception(exc, request_id(request), "")
            return JSONResponse(body, status_code=status, headers=error_headers(status))
        return error_response(exc.http_status, public_message(str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message, headers = public_message(str(exc.detail)), dict(exc.headers or {})
        if is_openai(request.url.path):
            path = request.url.path  # the client's own, so no server path: only bounded
            what = f"{request.method} {path if len(path) <= 200 else path[:199] + '…'}"
            return openai_response(exc.status_code, f"{message}: {what}", headers)
        return error_response(exc.status_code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:5])
        if is_openai(request.url.path):
            where = [str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p not in ("body", "path", "query")]
            param = ".".join(where) or None
            return openai_response(400, public_message(f"invalid request: {problems}"), param=param)
        return error_response(400, public_message(f"invalid request: {problems}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)


def _internal(request: Request, exc: BaseException) -> JSONResponse:
    rid = request_id(request)
    log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
    message = f"internal server error; the server's log has the details under request id {rid}"
    if is_openai(request.url.path):
        return openai_response(500, message, {"X-Request-ID": rid})
    return error_response(500, message, {"X-Request-ID": rid})
