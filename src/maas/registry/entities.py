"""What the registry hands out: frozen dataclasses, never ORM rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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


#: What ``maas gc`` removes: an ``artifact`` no version references; an ``upload`` or ``scratch`` folder left
#: in the artifact store's ``tmp/`` by a registration that died; an ``extraction`` a load that died left in
#: ``cache/hf/``; a ``cache`` folder holding an artifact no version references any more.
DEBRIS_KINDS = ("artifact", "upload", "scratch", "extraction", "cache")


@dataclass(frozen=True)
class Debris:
    """A file or folder in ``MAAS_HOME`` that no version and no running process uses."""

    kind: str  # one of DEBRIS_KINDS
    path: str  # relative to MAAS_HOME (absolute when it lies outside)
    size: int  # bytes, all files of a folder together
    age_s: float  # seconds since it (or anything in it) last changed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size": self.size, "age_s": round(self.age_s, 3)}


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Registry.verify` found: each version's digest check, and the debris in the store.

    Iterating over it yields the per-version results. ``ok`` is about the versions only: debris costs
    disk space, never correctness, and ``maas gc`` removes it.
    """

    versions: tuple[VerifyResult, ...]
    debris: tuple[Debris, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.versions)

    @property
    def debris_bytes(self) -> int:
        return sum(d.size for d in self.debris)

    def __iter__(self) -> Iterator[VerifyResult]:
        return iter(self.versions)

    def __len__(self) -> int:
        return len(self.versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "versions": [asdict(r) for r in self.versions],
            "debris": [d.to_dict() for d in self.debris],
            "debris_bytes": self.debris_bytes,
        }


@dataclass(frozen=True)
class GcResult:
    """What :meth:`Registry.gc` removed (or, with ``dry_run``, would remove)."""

    removed: tuple[Debris, ...]
    in_use: int  # temporaries left alone because a running process holds them (or may: recent extractions)
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(d.size for d in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": [d.to_dict() for d in self.removed],
            "bytes_freed": self.bytes_freed,
            "in_use": self.in_use,
        }


@dataclass(frozen=True)
class ServingTarget:
    """A snapshot row for the server's watcher: which version a bare model name means right now."""

    name: str
    version: int | None  # the `production` alias, else the latest version; None if the model has none
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    """How a server serves a model name: batching, queueing, parallelism. ``revision`` 0 means the defaults.

    The rules of the values are :func:`maas.registry.deployments.check_deployment`; the registry hands out only
    deployments that follow them.
    """

    name: str  # the model name
    max_batch_size: int = 1  # 1: no dynamic batching; else the most rows a batch holds (1..4096)
    max_queue_delay_ms: float = 0.0  # how long a request may wait for company (0..10000); 0: never waits while idle
    preferred_batch_sizes: tuple[int, ...] = ()  # batch sizes worth waiting for: each 1..max_batch_size, sorted, unique
    max_queue_size: int = 256  # requests waiting per loaded version (1..1_000_000); beyond: 429
    instances: int = 1  # batches of this model run at once (1..64)
    threads: int | None = None  # compute threads per instance (1..256); None: the server's default
    revision: int = 0  # moves on every change; 0: never deployed (the defaults)
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_size": self.max_queue_size,
            "instances": self.instances,
            "threads": self.threads,
            "revision": self.revision,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


#: Every status a training run can have; ``created`` until started, one of the last three once finished.
RUN_STATUSES = ("created", "running", "succeeded", "failed", "interrupted")
#: The statuses a run can finish with.
RUN_END_STATUSES = ("succeeded", "failed", "interrupted")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunStep:
    """The metrics of one optimizer step. ``loss`` is NaN when the step diverged."""

    step: int
    loss: float
    samples_per_s: float | None = None
    lr: float | None = None
    at: datetime = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "samples_per_s": self.samples_per_s,
            "lr": self.lr,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class RunEval:
    """The evaluation metrics of the model as it stood after ``step`` (NaN where a metric diverged)."""

    step: int
    metrics: dict[str, float]
    at: datetime = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "metrics": dict(self.metrics), "at": self.at.isoformat()}


@dataclass(frozen=True)
class RunCheckpoint:
    step: int
    path: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "path": self.path, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class Run:
    """One training run: its config, where it stands, and what it produced."""

    id: str  # 32 hex digits, made by maas
    name: str | None
    status: str  # one of RUN_STATUSES
    strategy: str
    world_size: int
    config: dict[str, Any]
    config_hash: str  # sha256 hex of the config as canonical JSON
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    model_uri: str | None = None  # models:/NAME/VERSION the run published
    last_step: int | None = None  # the highest step logged
    last_loss: float | None = None  # the loss at last_step

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end; None until the run has both."""
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "strategy": self.strategy,
            "world_size": self.world_size,
            "config": self.config,
            "config_hash": self.config_hash,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "duration_s": self.duration_s,
            "eval_metrics": dict(self.eval_metrics),
            "error": self.error,
            "model_uri": self.model_uri,
            "last_step": self.last_step,
            "last_loss": self.last_loss,
        }
