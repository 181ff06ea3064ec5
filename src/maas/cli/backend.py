"""Where the ``maas`` commands act: the local registry (``MAAS_HOME``, ``MAAS_DATABASE_URL``), or, when
``MAAS_SERVER_URL`` is set, a server through its admin API with ``MAAS_API_KEY``. Both sides hand out the same
entities through the same methods (the protocols below), so each command has one body and one output.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from maas import envs
from maas.errors import InvalidInput
from maas.registry import DEFAULT_ALIAS, AliasEvent, Deployment, ModelRef, ModelVersion, RegisteredModel

if TYPE_CHECKING:
    from maas.access.keys import ApiKey
    from maas.access.principal import KeyLimits, Role
    from maas.access.usage import UsageTotal
    from maas.cli.remote import AdminClient
    from maas.registry.audit import AuditEntry, AuditVerifyResult


class ModelRegistry(Protocol):
    """What the model and deployment commands call: :class:`~maas.registry.Registry`, or its remote twin."""

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
    ) -> ModelVersion: ...
    def list_models(self) -> list[RegisteredModel]: ...
    def get_model(self, name: str) -> RegisteredModel: ...
    def list_versions(self, name: str) -> list[ModelVersion]: ...
    def resolve(self, ref: str | ModelRef) -> ModelVersion: ...
    def set_alias(self, name: str, alias: str, version: int) -> AliasEvent: ...
    def delete_alias(self, name: str, alias: str) -> AliasEvent: ...
    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> AliasEvent: ...
    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]: ...
    def delete_version(self, name: str, version: int, *, force: bool = False) -> ModelVersion: ...
    def deploy(self, name: str, *, reset: bool = False, **changes: Any) -> Deployment: ...
    def get_deployment(self, name: str) -> Deployment: ...
    def list_deployments(self) -> list[Deployment]: ...
    def undeploy(self, name: str) -> bool: ...


class Keys(Protocol):
    """What ``maas keys`` calls: :class:`~maas.access.keys.KeyStore`, or its remote twin."""

    def create(
        self,
        name: str,
        role: Role | str,
        *,
        models: list[str] | tuple[str, ...] = (),
        expires_at: datetime | None = None,
        limits: KeyLimits = ...,
        created_by: str | None = None,
    ) -> tuple[ApiKey, str]: ...
    def list(self) -> list[ApiKey]: ...
    def get(self, key_id: str) -> ApiKey: ...
    def revoke(self, key_id: str) -> ApiKey: ...
    def rotate(self, key_id: str) -> tuple[ApiKey, str]: ...


class AuditLogView(Protocol):
    """What ``maas audit`` calls: :class:`~maas.registry.audit.AuditLog`, or its remote twin."""

    def list(
        self, *, since: datetime | None = None, actor: str | None = None, limit: int = 100
    ) -> list[AuditEntry]: ...
    def verify(self, *, expect_head: str | None = None) -> AuditVerifyResult: ...


class UsageView(Protocol):
    """What ``maas usage`` calls: :class:`~maas.access.usage.UsageStore`, or its remote twin."""

    def query(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "day",
    ) -> list[UsageTotal]: ...


def server_url() -> str | None:
    """``MAAS_SERVER_URL`` when set (the commands then act on that server), else None."""
    url = (envs.MAAS_SERVER_URL or "").strip()
    return url or None


def client() -> AdminClient:
    from maas.cli.remote import AdminClient

    url = server_url()
    if url is None:
        raise InvalidInput("MAAS_SERVER_URL is not set; set it to the server's URL, e.g. http://127.0.0.1:8000")
    return AdminClient(url, (envs.MAAS_API_KEY or "").strip() or None)


def registry() -> ModelRegistry:
    if server_url():
        from maas.cli.remote_registry import RemoteRegistry

        return RemoteRegistry(client())
    from maas.registry import Registry

    return Registry()


def keys() -> Keys:
    if server_url():
        from maas.cli.remote_access import RemoteKeys

        return RemoteKeys(client())
    from maas.access.keys import KeyStore, database_of
    from maas.registry import Registry

    return KeyStore(database_of(Registry()))


def audit_log() -> AuditLogView:
    if server_url():
        from maas.cli.remote_access import RemoteAuditLog

        return RemoteAuditLog(client())
    from maas.access.keys import database_of
    from maas.registry import Registry
    from maas.registry.audit import AuditLog

    return AuditLog(database_of(Registry()))


def usage() -> UsageView:
    if server_url():
        from maas.cli.remote_access import RemoteUsage

        return RemoteUsage(client())
    from maas.access.keys import database_of
    from maas.access.usage import UsageStore
    from maas.registry import Registry

    return UsageStore(database_of(Registry()))


def local_only(command: str, why: str) -> None:
    """Refuse ``command`` when MAAS_SERVER_URL is set, rather than quietly act on the local registry."""
    url = server_url()
    if url:
        raise InvalidInput(
            f"`{command}` acts only on the local registry ({why}); MAAS_SERVER_URL is set ({url}): run it on the "
            "server's machine, or unset MAAS_SERVER_URL to act on this machine's registry"
        )
