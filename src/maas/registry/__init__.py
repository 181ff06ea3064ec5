"""The model registry: numbered versions, aliases, lineage and content-addressed artifacts."""

from maas.registry.entities import (
    RUN_STATUSES,
    AliasEvent,
    Debris,
    Deployment,
    GcResult,
    Lineage,
    ModelVersion,
    RegisteredModel,
    Run,
    RunCheckpoint,
    RunEval,
    RunStep,
    ServingTarget,
    VerifyReport,
    VerifyResult,
)
from maas.registry.registry import DEFAULT_ALIAS, Registry
from maas.registry.runs import config_hash
from maas.registry.uri import ModelRef, parse_ref, validate_alias, validate_name

__all__ = [
    "DEFAULT_ALIAS",
    "RUN_STATUSES",
    "AliasEvent",
    "Debris",
    "Deployment",
    "GcResult",
    "Lineage",
    "ModelRef",
    "ModelVersion",
    "RegisteredModel",
    "Registry",
    "Run",
    "RunCheckpoint",
    "RunEval",
    "RunStep",
    "ServingTarget",
    "VerifyReport",
    "VerifyResult",
    "config_hash",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
