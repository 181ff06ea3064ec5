"""HTTP routes of the Open Inference Protocol v2 (KServe/Triton REST), binary tensor extension included."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from maas.errors import InvalidInput, UnsupportedMediaType
from maas.serving.api.v2.service import V2Service
from maas.tensors import DATATYPES

HEADER_LENGTH = "inference-header-content-length"

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
#: The request body as OpenAPI sees it: the JSON form (the binary extension appends raw tensor bytes to it).
INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


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


def _encoding(request: Request) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in ("identity", "gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    return encoding


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
        encoding = _encoding(request)
        body = await request.body()
        payload, headers = await _service(request).infer(name, version, body, header_length, encoding)
        media_type = headers.pop("Content-Type", "application/json")
        return Response(payload, media_type=media_type, headers=headers)

    @router.post("/models/{name}/infer", openapi_extra=INFER_OPENAPI)
    async def infer(name: str, request: Request) -> Response:
        return await _infer(request, name, None)

    @router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_OPENAPI)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(request, name, version)

    return router
