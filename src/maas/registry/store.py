"""What the registry needs from its metadata storage, and which store a database URL opens.

:class:`MetadataStore` is the interface the :class:`~maas.registry.registry.Registry` facade is written
against: models, versions, aliases, deployments and what a server or ``maas gc`` asks of them, each call
one transaction; runs are its :attr:`~MetadataStore.runs`, a :class:`~maas.registry.runs.RunStore`. Every
method returns entities (frozen dataclasses), never a storage row. A store is chosen by the URL's scheme
through :data:`STORES` and imported on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, cast

from maas.imports import load_entry
from maas.registry.entities import AliasEvent, Deployment, Lineage, ModelVersion, RegisteredModel, ServingTarget
from maas.registry.runs import RunStore
from maas.tensors import Signature

#: URL scheme (before any ``+driver``) -> "module:class" of the store that opens it.
STORES = {
    "sqlite": "maas.registry.sql.store:SqlStore",
    "postgresql": "maas.registry.sql.store:SqlStore",
}
#: Any other SQLAlchemy URL goes to the SQL store, which tells what it cannot open.
DEFAULT_STORE = "maas.registry.sql.store:SqlStore"


class MetadataStore(ABC):
    """Registry metadata: models, their versions, aliases and deployments, and training runs (:attr:`runs`).

    Names and aliases arrive validated; a missing model, version or alias is ``NotFound``.
    """

    #: The training runs kept beside the models.
    runs: RunStore

    # --- models and versions -------------------------------------------------------------------

    @abstractmethod
    def create_version(
        self,
        name: str,
        *,
        format: str,
        signature: Signature,
        digest: str,
        size: int,
        description: str,
        tags: dict[str, str],
        metrics: dict[str, float],
        lineage: Lineage,
        alias: str | None,
    ) -> ModelVersion:
        """Add the next version of ``name`` (creating the model if new), optionally pointing ``alias`` at it."""

    @abstractmethod
    def update_version(
        self,
        name: str,
        version: int,
        *,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ModelVersion:
        """Change a version's description, or merge into its tags and metrics. The artifact never changes."""

    @abstractmethod
    def list_models(self) -> list[RegisteredModel]:
        """Every model, by name."""

    @abstractmethod
    def get_model(self, name: str) -> RegisteredModel: ...

    @abstractmethod
    def list_versions(self, name: str) -> list[ModelVersion]:
        """The versions of ``name``, oldest first."""

    @abstractmethod
    def get_version(self, name: str, version: int) -> ModelVersion: ...

    @abstractmethod
    def latest_version(self, name: str) -> int | None:
        """The highest version number of ``name``; None when it has no versions."""

    @abstractmethod
    def delete_version(self, name: str, version: int, *, force: bool, actor: str | None) -> tuple[ModelVersion, bool]:
        """Delete a version; returns it and whether its artifact is still used by another version.

        ``Conflict`` while an alias points at it, unless ``force``, which deletes those aliases too."""

    @abstractmethod
    def delete_model(self, name: str) -> list[str]:
        """Delete a model with all its versions and history; returns the digests no longer used."""

    # --- aliases -------------------------------------------------------------------------------

    @abstractmethod
    def get_alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at; None when ``name`` has no such alias."""

    @abstractmethod
    def set_alias(self, name: str, alias: str, version: int, *, actor: str | None) -> AliasEvent: ...

    @abstractmethod
    def delete_alias(self, name: str, alias: str, *, actor: str | None) -> AliasEvent: ...

    @abstractmethod
    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of ``alias`` (of every alias when None), oldest first."""

    @abstractmethod
    def rollback(self, name: str, alias: str, *, actor: str | None) -> AliasEvent:
        """Point ``alias`` back at the version it held before its last move; repeated calls keep walking
        back, skipping versions deleted since."""

    # --- deployments ---------------------------------------------------------------------------

    @abstractmethod
    def put_deployment(self, name: str, values: Mapping[str, Any]) -> Deployment:
        """Merge ``values`` (settings of :class:`Deployment`) into the deployment of ``name``, or into the defaults
        when it has none, and store the result, checked by
        :func:`~maas.registry.deployments.merge_deployment`, with the next revision. A merge that changes nothing
        returns the deployment as it is, its revision unchanged."""

    @abstractmethod
    def get_deployment(self, name: str) -> Deployment | None:
        """The stored deployment of ``name``; None when it has none (it runs with the defaults)."""

    @abstractmethod
    def list_deployments(self) -> list[Deployment]:
        """Every stored deployment, by model name, in one query."""

    @abstractmethod
    def delete_deployment(self, name: str) -> bool:
        """Put ``name`` back on the defaults; whether it had a deployment. The revision a later deployment gets
        still counts up from the last one."""

    # --- serving and garbage collection --------------------------------------------------------

    @abstractmethod
    def serving_targets(self, default_alias: str) -> list[ServingTarget]:
        """For every model: its aliases, and the version a bare name means (``default_alias``, else latest)."""

    @abstractmethod
    def version_digests(self) -> dict[tuple[str, int], str]:
        """Every existing (name, version) with its artifact digest."""

    @abstractmethod
    def referenced_digests(self) -> set[str]:
        """The artifact digest of every version of every model."""


def open_store(url: str, *, busy_timeout_s: float = 60.0) -> MetadataStore:
    """The store for the database at ``url`` (a SQLAlchemy URL), its schema brought up to date."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    cls = load_entry(STORES.get(scheme, DEFAULT_STORE))
    return cast(MetadataStore, cls(url, busy_timeout_s=busy_timeout_s))
