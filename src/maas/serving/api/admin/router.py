"""The admin API's routes under ``/admin/v1``. Every request already passed the access gate (a valid key when auth
is on); each handler checks what the key's role may do to the model it names (:mod:`.policy`)."""

from __future__ import annotations

from fastapi import APIRouter

from maas.serving.api.admin import deployments, keys, models, records, upload
from maas.serving.api.admin.protocol import AliasBody, DeployBody, KeyBody, openapi_body

PREFIX = "/admin/v1"

_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "parameters": [
        {
            "name": upload.DIGEST_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "sha256 of the body (hex); the upload is refused (400) when it does not match.",
        }
    ],
}


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["admin"])
    add = router.add_api_route
    add("/models", models.list_models, methods=["GET"])
    add("/models/{name}", models.show_model, methods=["GET"])
    add("/models/{name}/resolve", models.resolve, methods=["GET"])
    add("/models/{name}/versions", upload.register, methods=["POST"], status_code=201, openapi_extra=_UPLOAD_OPENAPI)
    add("/models/{name}/versions/{version}", models.show_version, methods=["GET"])
    add("/models/{name}/versions/{version}", models.delete_version, methods=["DELETE"])
    add("/models/{name}/aliases/{alias}", models.show_alias, methods=["GET"])
    add("/models/{name}/aliases/{alias}", models.set_alias, methods=["PUT"], openapi_extra=openapi_body(AliasBody))
    add("/models/{name}/aliases/{alias}", models.delete_alias, methods=["DELETE"])
    add("/models/{name}/aliases/{alias}/rollback", models.rollback, methods=["POST"])
    add("/models/{name}/alias-history", models.alias_history, methods=["GET"])
    add("/deployments", deployments.list_deployments, methods=["GET"])
    add("/deployments/{name}", deployments.show_deployment, methods=["GET"])
    add("/deployments/{name}", deployments.put_deployment, methods=["PUT"], openapi_extra=openapi_body(DeployBody))
    add("/deployments/{name}", deployments.delete_deployment, methods=["DELETE"])
    add("/keys", keys.list_keys, methods=["GET"])
    add("/keys", keys.create_key, methods=["POST"], status_code=201, openapi_extra=openapi_body(KeyBody))
    add("/keys/{key_id}", keys.show_key, methods=["GET"])
    add("/keys/{key_id}/revoke", keys.revoke_key, methods=["POST"])
    add("/keys/{key_id}/rotate", keys.rotate_key, methods=["POST"])
    add("/audit", records.list_audit, methods=["GET"])
    add("/audit/verify", records.verify_audit, methods=["GET"])
    add("/usage", records.usage, methods=["GET"])
    return router
