"""What the registry hands out: frozen dataclasses, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from maas.tensors import Signature


@dataclass(frozen=True)
class Lineage:
    """Where a version came from."""

    parent: str | None = None  # models:/NAME/VERSION of the version it was derived from
    source_run: str | None = None  # id of the training run or compression job that produced it
    creator: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. config hash, dataset fingerprint, recipe

    def to_dict(self) -> dict[str, Any]:
        return {"parent": self.parent, "source_run": self.source_run, "creator": self.creator, "extra": self.extra}


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    format: str
    signature: Signature
    artifact_digest: str  # "sha256:<hex>"
    artifact_size: int
    created_at: datetime
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "format": self.format,
            "signature": self.signature.to_dict(),
            "artifact_digest": self.artifact_digest,
            "artifact_size": self.artifact_size,
            "created_at": self.created_at.isoformat(),
            "description": self.description,
            "tags": dict(self.tags),
            "metrics": dict(self.metrics),
            "lineage": self.lineage.to_dict(),
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    created_at: datetime
    updated_at: datetime
    description: str = ""
    aliases: dict[str, int] = field(default_factory=dict)  # alias -> version
    latest_version: int | None = None
    version_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "description": self.description,
            "aliases": dict(self.aliases),
            "latest_version": self.latest_version,
            "version_count": self.version_count,
        }


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias: set (from None or another version), rollback, or delete (to None)."""

    name: str
    alias: str
    action: str  # "set" | "rollback" | "delete"
    from_version: int | None
    to_version: int | None
    actor: str | None
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "action": self.action,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "actor": self.actor,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-checking one version's artifact digest."""

    name: str
    version: int
    ok: bool
    expected: str
    actual: str | None  # None when the file is missing
    message: str = ""


@dataclass(frozen=True)
class ServingTarget:
    """A snapshot row for the server's watcher: which version a bare model name means right now."""

    name: str
    version: int | None  # the `production` alias, else the latest version; None if the model has none
    aliases: dict[str, int] = field(default_factory=dict)
