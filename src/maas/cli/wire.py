"""The admin API's answers back into the entities the local registry hands out, so that every command prints a
remote result with the same code, and the same ``--json``, as a local one. Each is the inverse of the entity's
``to_dict``."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from maas.access.keys import ApiKey
from maas.access.principal import KeyLimits, Role
from maas.access.usage import UsageTotal
from maas.registry import AliasEvent, Deployment, Lineage, ModelVersion, RegisteredModel
from maas.registry.audit import AuditEntry, AuditProblem, AuditVerifyResult
from maas.tensors import Signature


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _maybe_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)  # JSON carries NaN as null


def model_version(d: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        name=d["name"],
        version=int(d["version"]),
        format=d["format"],
        signature=Signature.from_dict(d["signature"]),
        artifact_digest=d["artifact_digest"],
        artifact_size=int(d["artifact_size"]),
        created_at=_time(d["created_at"]),
        description=d.get("description", ""),
        tags=dict(d.get("tags") or {}),
        metrics={k: _number(v) for k, v in (d.get("metrics") or {}).items()},
        lineage=Lineage(**(d.get("lineage") or {})),
        aliases=tuple(d.get("aliases") or ()),
    )


def registered_model(d: dict[str, Any]) -> RegisteredModel:
    return RegisteredModel(
        name=d["name"],
        created_at=_time(d["created_at"]),
        updated_at=_time(d["updated_at"]),
        description=d.get("description", ""),
        aliases={k: int(v) for k, v in (d.get("aliases") or {}).items()},
        latest_version=d.get("latest_version"),
        version_count=int(d.get("version_count", 0)),
    )


def alias_event(d: dict[str, Any]) -> AliasEvent:
    return AliasEvent(
        name=d["name"],
        alias=d["alias"],
        action=d["action"],
        from_version=d.get("from_version"),
        to_version=d.get("to_version"),
        actor=d.get("actor"),
        at=_time(d["at"]),
    )


def deployment(d: dict[str, Any]) -> Deployment:
    return Deployment(
        name=d["name"],
        max_batch_size=int(d["max_batch_size"]),
        max_queue_delay_ms=float(d["max_queue_delay_ms"]),
        preferred_batch_sizes=tuple(int(s) for s in d["preferred_batch_sizes"]),
        max_queue_size=int(d["max_queue_size"]),
        instances=int(d["instances"]),
        threads=None if d.get("threads") is None else int(d["threads"]),
        revision=int(d["revision"]),
        updated_at=_maybe_time(d.get("updated_at")),
    )


def api_key(d: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=d["id"],
        name=d["name"],
        role=Role(d["role"]),
        models=tuple(d.get("models") or ()),
        limits=KeyLimits.from_dict(d.get("limits") or {}),
        created_at=_time(d["created_at"]),
        created_by=d.get("created_by"),
        expires_at=_maybe_time(d.get("expires_at")),
        revoked_at=_maybe_time(d.get("revoked_at")),
        rotated_at=_maybe_time(d.get("rotated_at")),
    )


def audit_entry(d: dict[str, Any]) -> AuditEntry:
    return AuditEntry(
        seq=int(d["seq"]),
        at=_time(d["at"]),
        actor=d.get("actor"),
        action=d["action"],
        target=d["target"],
        before=d.get("before"),
        after=d.get("after"),
        request_id=d.get("request_id"),
        client=d.get("client"),
        prev_hash=d["prev_hash"],
        hash=d["hash"],
    )


def audit_verify(d: dict[str, Any]) -> AuditVerifyResult:
    return AuditVerifyResult(
        rows=int(d["rows"]),
        head_seq=d.get("head_seq"),
        head_hash=d["head_hash"],
        problems=tuple(AuditProblem(p.get("seq"), p["kind"], p["detail"]) for p in d.get("problems") or ()),
    )


def usage_total(d: dict[str, Any]) -> UsageTotal:
    return UsageTotal(
        key_id=d["key_id"],
        model=d["model"],
        version=int(d["version"]),
        period=_maybe_time(d.get("period")),
        requests=int(d["requests"]),
        errors=int(d["errors"]),
        items=int(d["items"]),
        prompt_tokens=int(d["prompt_tokens"]),
        completion_tokens=int(d["completion_tokens"]),
        compute_s=float(d["compute_s"]),
    )
