"""The registry of a remote server, through its admin API: the methods of :class:`~maas.registry.Registry` that the
``maas models``, ``maas deploy`` and ``maas deployments`` commands call, returning the same entities."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maas.cli import wire
from maas.cli.remote import AdminClient, quote
from maas.errors import InvalidInput
from maas.registry import DEFAULT_ALIAS, AliasEvent, Deployment, ModelRef, ModelVersion, RegisteredModel, parse_ref
from maas.registry.uri import LATEST

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class RemoteRegistry:
    """See the module docstring. Every name is checked here as the local registry checks it, and again by the
    server."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def _model(self, name: str) -> str:
        return f"/models/{quote(parse_ref(name).name)}"

    def _get(self, path: str, **query: Any) -> Any:
        return self.client.call("GET", path, query=query or None)

    # --- entering ------------------------------------------------------------------------------

    def register(
        self,
        path: str | Path,
        name: str,
        *,
        format: str | None = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        alias: str | None = None,
        parent: str | None = None,
    ) -> ModelVersion:
        """Upload the model file at ``path`` (a Hugging Face directory: packed here into the one file the registry
        stores it as) with its sha256, which the server checks before it registers anything."""
        path = Path(path)
        if not path.exists():
            raise InvalidInput(
                f"{path} does not exist; give the path of a model file (.onnx, .pt2 or .gguf) or of a Hugging Face "
                "model directory"
            )
        query: dict[str, Any] = {
            "alias": alias,
            "format": format,
            "description": description or None,
            "parent": parent,
            "tag": [f"{k}={v}" for k, v in (tags or {}).items()],
            "metric": [f"{k}={v!r}" for k, v in (metrics or {}).items()],
        }
        if not path.is_dir():
            return self._upload(path, path.name, name, query)
        from maas import runtimes

        fmt = format or runtimes.detect_format(path)
        with tempfile.TemporaryDirectory(prefix="maas-upload-") as tmp:
            packed = runtimes.pack(path, fmt, Path(tmp))
            return self._upload(packed, f"{path.name or 'model'}.zip", name, {**query, "format": fmt})

    def _upload(self, file: Path, filename: str, name: str, query: dict[str, Any]) -> ModelVersion:
        answer = self.client.call(
            "POST",
            f"{self._model(name)}/versions",
            query={**query, "filename": filename},
            upload=file,
            headers={"X-Maas-Sha256": _sha256(file)},
        )
        return self.client.decode(wire.model_version, answer)

    # --- reading -------------------------------------------------------------------------------

    def list_models(self) -> list[RegisteredModel]:
        return self.client.decode_list(wire.registered_model, self._get("/models"), "models")

    def get_model(self, name: str) -> RegisteredModel:
        return self.client.decode(wire.registered_model, self._get(self._model(name)))

    def list_versions(self, name: str) -> list[ModelVersion]:
        return self.client.decode_list(wire.model_version, self._get(self._model(name)), "versions")

    def get_version(self, name: str, version: int) -> ModelVersion:
        answer = self._get(f"{self._model(name)}/versions/{int(version)}")
        return self.client.decode(wire.model_version, answer)

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.version is not None:
            return self.get_version(r.name, r.version)
        if r.alias is not None:
            answer = self._get(f"{self._model(r.name)}/aliases/{quote(r.alias or LATEST)}")
        else:
            answer = self._get(f"{self._model(r.name)}/resolve")
        return self.client.decode(wire.model_version, answer)

    # --- aliases -------------------------------------------------------------------------------

    def _event(self, method: str, path: str, body: Any = None) -> AliasEvent:
        return self.client.decode(wire.alias_event, self.client.call(method, path, body=body))

    def set_alias(self, name: str, alias: str, version: int) -> AliasEvent:
        return self._event("PUT", f"{self._model(name)}/aliases/{quote(alias)}", {"version": int(version)})

    def delete_alias(self, name: str, alias: str) -> AliasEvent:
        return self._event("DELETE", f"{self._model(name)}/aliases/{quote(alias)}")

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> AliasEvent:
        return self._event("POST", f"{self._model(name)}/aliases/{quote(alias)}/rollback")

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        answer = self._get(f"{self._model(name)}/alias-history", alias=alias)
        return self.client.decode_list(wire.alias_event, answer, "events")

    # --- removing ------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int, *, force: bool = False) -> ModelVersion:
        path = f"{self._model(name)}/versions/{int(version)}"
        answer = self.client.call("DELETE", path, query={"force": "true"} if force else None)
        return self.client.decode(wire.model_version, answer)

    # --- deployments ---------------------------------------------------------------------------

    def _deployment(self, name: str) -> str:
        return f"/deployments/{quote(parse_ref(name).name)}"

    def deploy(self, name: str, *, reset: bool = False, **changes: Any) -> Deployment:
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
        answer = self.client.call("PUT", self._deployment(name), body={"settings": settings, "reset": reset})
        return self.client.decode(wire.deployment, answer)

    def get_deployment(self, name: str) -> Deployment:
        return self.client.decode(wire.deployment, self._get(self._deployment(name)))

    def list_deployments(self) -> list[Deployment]:
        return self.client.decode_list(wire.deployment, self._get("/deployments"), "deployments")

    def undeploy(self, name: str) -> bool:
        return self.client.decode(lambda a: bool(a["deleted"]), self.client.call("DELETE", self._deployment(name)))
