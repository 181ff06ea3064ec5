"""The model registry: numbered versions, aliases, lineage and content-addressed artifacts."""

from maas.registry.entities import AliasEvent, Lineage, ModelVersion, RegisteredModel, ServingTarget, VerifyResult
from maas.registry.registry import DEFAULT_ALIAS, Registry
from maas.registry.uri import ModelRef, parse_ref, validate_alias, validate_name

__all__ = [
    "DEFAULT_ALIAS",
    "AliasEvent",
    "Lineage",
    "ModelRef",
    "ModelVersion",
    "RegisteredModel",
    "Registry",
    "ServingTarget",
    "VerifyResult",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
