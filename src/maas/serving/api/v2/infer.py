"""The Open Inference Protocol REST inference call, on the serving engine.

:class:`FastInfer` answers ``POST /v2/models/{name}[/versions/{v}]/infer`` as plain ASGI, before FastAPI's
routing and dependency machinery (which cost more than the whole model call of a small MLP and check nothing
:func:`~maas.serving.api.v2.protocol.decode_request` does not check better); every other path goes on to FastAPI.
The same :func:`infer` also backs the FastAPI routes that document the call in OpenAPI.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from maas.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from maas.serving import errors
from maas.serving.api.v2 import protocol
from maas.serving.context import ServingContext
from maas.serving.engine.types import InferRequest
from maas.serving.limits import payload_bytes
from maas.tensors import Signature

#: Bodies over this size (and every compressed body) count as heavy: at most ``max_concurrent_decodes`` at once.
HEAVY_BODY_BYTES = 256 * 1024
#: Responses whose tensors hold more than this are encoded in a thread, not on the event loop.
INLINE_ENCODE_BYTES = 32 * 1024
HEADER_LENGTH = "inference-header-content-length"

_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def infer(
    ctx: ServingContext, name: str, version: str | None, body: bytes, json_length: int | None, encoding: str
) -> tuple[bytes, dict[str, str]]:
    """Decode, run and encode one REST request; returns the body and its headers (Content-Type included)."""
    binary: list[set[str] | bool] = []
    limits = ctx.settings.limits

    def decode(signature: Signature) -> InferRequest:
        raw = body if encoding == "identity" else inflate(body, encoding, limits.max_inflated_bytes)
        decoded = protocol.decode_request(raw, json_length, signature, limits)
        binary.append(decoded.binary)
        return InferRequest(decoded.inputs, decoded.requested_outputs, decoded.id, decoded.parameters)

    heavy = len(body) > HEAVY_BODY_BYTES or encoding != "identity"
    _, response = await ctx.engine.infer(name, version, decode, size=len(body), heavy=heavy)

    def encode() -> tuple[bytes, dict[str, str]]:
        return protocol.encode_response(
            response.model_name,
            response.model_version,
            response.id,
            response.outputs,
            binary[0],
            limits.max_output_bytes,
        )

    if sum(payload_bytes(a) for a in response.outputs.values()) <= INLINE_ENCODE_BYTES:
        return encode()
    result: tuple[bytes, dict[str, str]] = await asyncio.get_running_loop().run_in_executor(ctx.executor, encode)
    return result


def header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise InvalidInput(f"header Inference-Header-Content-Length must be a byte count, got {raw!r}")
    return int(raw)


def content_encoding(raw: str | None) -> str:
    encoding = (raw or "identity").strip().lower() or "identity"
    if encoding not in ("identity", "gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    return encoding


class FastInfer:
    """ASGI middleware: the inference route without FastAPI (see the module docstring)."""

    def __init__(self, app: ASGIApp, ctx: ServingContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        try:
            headers = _headers(scope)
            length = header_length(headers.get(HEADER_LENGTH))
            encoding = content_encoding(headers.get("content-encoding"))
            body = await _read_body(receive)
            payload, out_headers = await infer(self.ctx, match[1], match[2], body, length, encoding)
            status = 200
        except _Disconnected:
            return  # nobody to answer
        except Exception as exc:
            rid = scope.get("maas.request_id", "-")
            status, out_headers, payload = errors.render(exc, rid, f"POST {scope['path']}")
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out_headers.items()]
        raw_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


class _Disconnected(Exception):
    """The client went away before its body arrived."""


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        k = key.decode("latin-1")
        if k in (HEADER_LENGTH, "content-encoding"):
            out[k] = value.decode("latin-1")
    return out


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression) up to ``limit`` bytes.

    The stream must end cleanly: complete (a gzip trailer, whose CRC and length zlib checks) and with
    nothing after it.
    """
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"request body inflates to over the limit of {limit:,} bytes (MAAS_MAX_INFLATED_BYTES); send smaller "
            "batches"
        )
    if not inflater.eof:
        raise InvalidInput(f"request body is a truncated {encoding} stream; send the whole compressed body")
    if inflater.unused_data:
        raise InvalidInput(
            f"request body has {len(inflater.unused_data)} bytes after the end of its {encoding} stream; "
            "send exactly one compressed stream"
        )
    return out
