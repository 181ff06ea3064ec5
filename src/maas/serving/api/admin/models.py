"""Admin API handlers for models, versions and aliases: list and show (what the caller may see), move and delete
aliases, roll back, delete versions. Registering a version by upload is :mod:`.upload`."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from maas.access.principal import Principal
from maas.errors import InvalidInput
from maas.registry import ModelRef, ModelVersion, parse_ref, validate_alias
from maas.registry.uri import parse_version
from maas.serving.access.context import current_principal
from maas.serving.api.admin.policy import actor, json_response, publishable, readable, registry, run
from maas.serving.api.admin.protocol import AliasBody, read_json


def shown(mv: ModelVersion) -> dict[str, Any]:
    """``mv`` as the caller may see it: lineage naming a model the caller may not see (a parent, a teacher in the
    recipe's record) is left out, so a child does not leak its parent's name."""
    data = mv.to_dict()
    p = current_principal()

    def visible(value: Any) -> bool:
        if not isinstance(value, str) or not value.startswith("models:/"):
            return True
        try:
            return p.sees(parse_ref(value).name)
        except InvalidInput:
            return False

    lineage = dict(data.get("lineage") or {})
    if not visible(lineage.get("parent")):
        lineage["parent"] = None
    extra = lineage.get("extra")
    if isinstance(extra, dict):
        lineage["extra"] = {k: v for k, v in extra.items() if visible(v)}
    data["lineage"] = lineage
    return data


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
        return {**model.to_dict(), "versions": [shown(v) for v in reg.list_versions(name)]}

    return json_response(await run(request, read))


async def resolve(request: Request, name: str) -> Response:
    """The version the bare name means: its ``production`` alias, else its latest version."""
    mv = await run(request, registry(request).resolve, ModelRef(readable(name)))
    return json_response(shown(mv))


async def show_version(request: Request, name: str, version: str) -> Response:
    readable(name)
    mv = await run(request, registry(request).get_version, name, parse_version(version))
    return json_response(shown(mv))


async def show_alias(request: Request, name: str, alias: str) -> Response:
    """The version ``NAME@ALIAS`` names (``latest``: the newest)."""
    readable(name)
    ref = ModelRef(name, alias=validate_alias(alias, settable=False))
    return json_response(shown(await run(request, registry(request).resolve, ref)))


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
    return json_response(shown(mv))
