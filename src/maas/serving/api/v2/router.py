"""HTTP routes of the Open Inference Protocol v2 (KServe/Triton REST), binary tensor extension included."""

from __future__ import annotations

import zlib

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from maas.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from maas.serving.api.v2.service import V2Service

HEADER_LENGTH = "inference-header-content-length"


def _service(request: Request) -> V2Service:
    service: V2Service = request.app.state.v2
    return service


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise InvalidInput(f"header Inference-Header-Content-Length must be a byte count, got {raw!r}")
    return int(raw)


def _decompress(body: bytes, request: Request) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), bounded by the body limit."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    limit = request.app.state.settings.max_request_bytes
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"request body inflates to over the limit of {limit:,} bytes; send smaller batches or raise "
            "MAAS_MAX_REQUEST_BYTES on the server"
        )
    return out


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        ok, why = request.app.state.manager.ready()
        return JSONResponse({"ready": True} if ok else {"ready": False, "error": why}, status_code=200 if ok else 503)

    @router.get("")
    async def server_metadata(request: Request) -> dict[str, object]:
        return _service(request).server_metadata()

    @router.get("/models/{name}")
    async def model_metadata(name: str, request: Request) -> dict[str, object]:
        return await _service(request).model_metadata(name, None)

    @router.get("/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str, request: Request) -> dict[str, object]:
        return await _service(request).model_metadata(name, version)

    async def _ready(request: Request, name: str, version: str | None) -> JSONResponse:
        ok, why = await _service(request).model_ready(name, version)
        body: dict[str, object] = {"name": name, "ready": ok}
        if version is not None:
            body["version"] = version
        if not ok:
            body["error"] = why
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/models/{name}/ready")
    async def model_ready(name: str, request: Request) -> JSONResponse:
        return await _ready(request, name, None)

    @router.get("/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str, request: Request) -> JSONResponse:
        return await _ready(request, name, version)

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        header_length = _header_length(request)
        body = await request.body()
        if request.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            body = await run_in_threadpool(_decompress, body, request)
        payload, headers = await _service(request).infer(name, version, body, header_length)
        media_type = headers.pop("Content-Type", "application/json")
        return Response(payload, media_type=media_type, headers=headers)

    @router.post("/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        return await _infer(request, name, None)

    @router.post("/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(request, name, version)

    return router
