"""Admin API handlers for deployments: how servers serve each model (``maas deploy`` and ``maas deployments``)."""

from __future__ import annotations

from fastapi import Request, Response

from maas.registry import Deployment
from maas.registry.deployments import changed_settings, merge_deployment
from maas.serving.access.context import current_principal
from maas.serving.api.admin.policy import json_response, publishable, readable, registry, run
from maas.serving.api.admin.protocol import DeployBody, read_json


async def list_deployments(request: Request) -> Response:
    p = current_principal()
    deployments = await run(request, registry(request).list_deployments)
    return json_response({"deployments": [d.to_dict() for d in deployments if p.sees(d.name)]})


async def show_deployment(request: Request, name: str) -> Response:
    """The model's deployment; the defaults (revision 0) when it has none."""
    return json_response((await run(request, registry(request).get_deployment, readable(name))).to_dict())


async def put_deployment(request: Request, name: str) -> Response:
    """Merge ``settings`` into the model's deployment (into the defaults with ``reset``); the answer names the
    settings that changed. An unknown setting or a value out of range changes nothing (400)."""
    publishable(name)
    body = await read_json(request, DeployBody)
    reg = registry(request)

    def work() -> tuple[Deployment, Deployment]:
        before = reg.get_deployment(name)
        merge_deployment(Deployment(name) if body.reset else before, body.settings)  # refuses unknown settings
        return before, reg.deploy(name, reset=body.reset, **body.settings)

    before, after = await run(request, work)
    return json_response({**after.to_dict(), "changed": changed_settings(before, after)})


async def delete_deployment(request: Request, name: str) -> Response:
    """Put the model back on the defaults; ``deleted`` says whether it had a deployment."""
    publishable(name)
    return json_response({"name": name, "deleted": await run(request, registry(request).undeploy, name)})
