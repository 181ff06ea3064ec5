"""Admin API handlers for API keys (admin keys only): make, list, show, revoke and rotate. A secret leaves the
server once, in the answer that made or rotated it."""

from __future__ import annotations

from fastapi import Request, Response

from maas.access.keys import KeyStore, check_key_id
from maas.access.principal import KeyLimits
from maas.access.times import parse_expiry
from maas.serving.api.admin.policy import admin_only, context, json_response, run
from maas.serving.api.admin.protocol import KeyBody, moment, read_json


def _keys(request: Request) -> KeyStore:
    admin_only("managing API keys")
    return context(request).access.keys


async def list_keys(request: Request) -> Response:
    keys = await run(request, _keys(request).list)
    return json_response({"keys": [k.to_dict() for k in keys]})


async def show_key(request: Request, key_id: str) -> Response:
    store = _keys(request)
    return json_response((await run(request, store.get, check_key_id(key_id))).to_dict())


async def create_key(request: Request) -> Response:
    """201 with the key and, under ``key``, its whole secret token."""
    store = _keys(request)
    body = await read_json(request, KeyBody)
    principal = admin_only("managing API keys")
    key, token = await run(
        request,
        store.create,
        body.name,
        body.role,
        models=body.models,
        expires_at=moment(body.expires, parse_expiry, "expires") if body.expires else None,
        limits=KeyLimits(**body.limits.model_dump()),
        created_by=principal.actor,
    )
    return json_response({**key.to_dict(), "key": token}, status=201)


async def revoke_key(request: Request, key_id: str) -> Response:
    store = _keys(request)
    return json_response((await run(request, store.revoke, check_key_id(key_id))).to_dict())


async def rotate_key(request: Request, key_id: str) -> Response:
    store = _keys(request)
    key, token = await run(request, store.rotate, check_key_id(key_id))
    return json_response({**key.to_dict(), "key": token})
