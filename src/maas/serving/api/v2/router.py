"""HTTP routes of the Open Inference Protocol v2 (KServe/Triton REST), binary tensor extension included; module-level
handlers over the serving context in ``app.state.ctx``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from maas.serving.api.v2 import infer as rest
from maas.serving.api.v2 import protocol
from maas.serving.context import ServingContext
from maas.tensors import DATATYPES

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


def _ctx(request: Request) -> ServingContext:
    ctx: ServingContext = request.app.state.ctx
    return ctx


async def live() -> dict[str, bool]:
    return {"live": True}


async def ready(request: Request) -> JSONResponse:
    ok, why = _ctx(request).engine.server_ready()
    return JSONResponse({"ready": True} if ok else {"ready": False, "error": why}, status_code=200 if ok else 503)


async def server_metadata(request: Request) -> dict[str, object]:
    return _ctx(request).engine.server_metadata()


async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, object]:
    meta = await _ctx(request).engine.model_metadata(name, version)
    return protocol.model_metadata(meta.name, meta.versions, meta.platform, meta.inputs, meta.outputs) | {
        "version": meta.version
    }


async def model_config(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return await _ctx(request).engine.model_config(name, version)


async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    ok, why = await _ctx(request).engine.model_ready(name, version)
    body: dict[str, object] = {"name": name, "ready": ok}
    if version is not None:
        body["version"] = version
    if not ok:
        body["error"] = why
    return JSONResponse(body, status_code=200 if ok else 503)


async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Documents the call in OpenAPI; requests normally reach :class:`maas.serving.api.v2.infer.FastInfer` first."""
    length = rest.header_length(request.headers.get(rest.HEADER_LENGTH))
    encoding = rest.content_encoding(request.headers.get("content-encoding"))
    body = await request.body()
    payload, headers = await rest.infer(_ctx(request), name, version, body, length, encoding)
    media_type = headers.pop("Content-Type", "application/json")
    return Response(payload, media_type=media_type, headers=headers)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    router.add_api_route("/health/live", live, methods=["GET"])
    router.add_api_route("/health/ready", ready, methods=["GET"])
    router.add_api_route("", server_metadata, methods=["GET"])
    router.add_api_route("/models/{name}", model_metadata, methods=["GET"])
    router.add_api_route("/models/{name}/versions/{version}", model_metadata, methods=["GET"])
    router.add_api_route("/models/{name}/config", model_config, methods=["GET"])
    router.add_api_route("/models/{name}/versions/{version}/config", model_config, methods=["GET"])
    router.add_api_route("/models/{name}/ready", model_ready, methods=["GET"])
    router.add_api_route("/models/{name}/versions/{version}/ready", model_ready, methods=["GET"])
    router.add_api_route("/models/{name}/infer", infer, methods=["POST"], openapi_extra=INFER_OPENAPI)
    router.add_api_route(
        "/models/{name}/versions/{version}/infer", infer, methods=["POST"], openapi_extra=INFER_OPENAPI
    )
    return router
