"""Roles, the principal a request acts as, and what each role may do to which model.

Deny by default: a key sees only the models its patterns match (an admin key sees every model), and a model it
may not see is reported as missing, so names do not leak.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from enum import StrEnum

from maas.errors import InvalidInput


class Role(StrEnum):
    #: Everything: keys, usage of every key, the audit log, every model.
    ADMIN = "admin"
    #: Register, alias, deploy, delete, and use the models its patterns match.
    PUBLISHER = "publisher"
    #: Inference and metadata on the models its patterns match.
    CONSUMER = "consumer"
    #: ``/metrics`` and health; no model.
    MONITOR = "monitor"


#: A model-name pattern: the characters of a model name plus the fnmatch wildcards ``*`` and ``?``.
_PATTERN = re.compile(r"[A-Za-z0-9._*?-]{1,128}")


def check_patterns(patterns: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``patterns`` checked (fnmatch ``*`` and ``?`` over model-name characters), without repeats."""
    out: list[str] = []
    for p in patterns:
        p = p.strip()
        if not _PATTERN.fullmatch(p):
            raise InvalidInput(
                f"model pattern {p!r} is not valid: use model-name characters (letters, digits, . _ -) and the "
                "wildcards * and ?, e.g. --models 'digits*,sentiment'"
            )
        if p not in out:
            out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class KeyLimits:
    """What one key may use; None is unlimited. Per minute: any 60 s (a sliding window); per day and per month:
    UTC calendar days and months."""

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    requests_per_day: int | None = None
    tokens_per_month: int | None = None

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> KeyLimits:
        return cls(**{k: int(v) for k, v in values.items() if k in cls.__dataclass_fields__})

    @property
    def any(self) -> bool:
        return bool(self.to_dict())


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key (``key_id``), or :data:`LOCAL` when auth is off."""

    key_id: str | None
    name: str
    role: Role
    models: tuple[str, ...] = ()
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def actor(self) -> str:
        """How the audit log and usage name this principal."""
        return f"key:{self.key_id}" if self.key_id else self.name

    def sees(self, model: str) -> bool:
        """Whether this principal may use (and even learn of) ``model``."""
        if self.role is Role.ADMIN:
            return True
        if self.role is Role.MONITOR:
            return False
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def may_publish(self, model: str) -> bool:
        """Register, alias, roll back, deploy or delete ``model``."""
        return self.role is Role.ADMIN or (self.role is Role.PUBLISHER and self.sees(model))

    @property
    def may_read_metrics(self) -> bool:
        return self.role in (Role.ADMIN, Role.MONITOR)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


#: The principal of every request when auth is off (a loopback bind under MAAS_AUTH=auto, or disabled).
LOCAL = Principal(key_id=None, name="local", role=Role.ADMIN, models=("*",))
