"""Admin API handlers for models, versions and aliases: list and show (what the caller may see), move and delete
aliases, roll back, delete versions. Registering a version by upload is :mod:`.upload`."""

from __future__ import annotations

from fastapi import Request, Response

from maas.access.principal import Principal
from maas.registry import ModelRef, validate_alias
from maas.registry.uri import parse_version
from maas.serving.access.context import current_principal
from maas.serving.api.admin.policy import actor, json_response, publishable, readable, registry, run
from maas.serving.api.admin.protocol import AliasBody, read_json


async def list_models(request: Request) -> Response:
    p: Principal = current_principal()
    models = await run(request, registry(request).list_models)
    return json_response({"models": [m.to_dict() for m in models if p.sees(m.name)]})


async def show_model(request: Request, name: str) -> Response:
    """The model and all its versions, as ``maas models show NAME --json`` prints them."""
    reg = registry(request)
    readable(name)

    def read() -> dict[str, object]:
        model = reg.get_model(name)
        return {**model.to_dict(), "versions": [v.to_dict() for v in reg.list_versions(name)]}

    return json_response(await run(request, read))


async def resolve(request: Request, name: str) -> Response:
    """The version the bare name means: its ``production`` alias, else its latest version."""
    mv = await run(request, registry(request).resolve, ModelRef(readable(name)))
    return json_response(mv.to_dict())


async def show_version(request: Request, name: str, version: str) -> Response:
    readable(name)
    mv = await run(request, registry(request).get_version, name, parse_version(version))
    return json_response(mv.to_dict())


async def show_alias(request: Request, name: str, alias: str) -> Response:
    """The version ``NAME@ALIAS`` names (``latest``: the newest)."""
    readable(name)
    ref = ModelRef(name, alias=validate_alias(alias, settable=False))
    return json_response((await run(request, registry(request).resolve, ref)).to_dict())


async def set_alias(request: Request, name: str, alias: str) -> Response:
    publishable(name)
    validate_alias(alias)
    body = await read_json(request, AliasBody)
    event = await run(request, registry(request).set_alias, name, alias, body.version, actor=actor())
    return json_response(event.to_dict())


async def delete_alias(request: Request, name: str, alias: str) -> Response:
    publishable(name)
    event = await run(request, registry(request).delete_alias, name, validate_alias(alias), actor=actor())
    return json_response(event.to_dict())


async def rollback(request: Request, name: str, alias: str) -> Response:
    publishable(name)
    event = await run(request, registry(request).rollback, name, validate_alias(alias), actor=actor())
    return json_response(event.to_dict())


async def alias_history(request: Request, name: str, alias: str | None = None) -> Response:
    readable(name)
    if alias is not None:
        validate_alias(alias, settable=False)
    events = await run(request, registry(request).alias_history, name, alias)
    return json_response({"events": [e.to_dict() for e in events]})


async def delete_version(request: Request, name: str, version: str, force: bool = False) -> Response:
    """Refused (409) while an alias points at the version, unless ``force``."""
    publishable(name)
    number = parse_version(version)
    mv = await run(request, registry(request).delete_version, name, number, force=force, actor=actor())
    return json_response(mv.to_dict())
