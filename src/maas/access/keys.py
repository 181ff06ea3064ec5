"""API keys: made, listed, revoked and rotated here, and the secret a request presents checked against them.

A key reads ``maas_<id>_<secret>``: ``id`` (12 hex digits) is public and names the key in listings, usage and the
audit log; ``secret`` (32 random bytes, base64url) is shown once, when the key is made or rotated. The database
keeps only its sha256, compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from maas.access.principal import KeyLimits, Principal, Role, check_patterns
from maas.errors import InvalidInput, NotFound
from maas.registry import Registry
from maas.registry.schema_access import ApiKeyRow
from maas.registry.sql.engine import Database, now, utc

PREFIX = "maas_"
_TOKEN = re.compile(r"maas_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[0-9a-f]{12}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@ -]{0,127}")


@dataclass(frozen=True)
class ApiKey:
    """A key as listings show it: never its secret."""

    id: str
    name: str
    role: Role
    models: tuple[str, ...]
    limits: KeyLimits
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None

    def state(self, at: datetime | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (at or now()):
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(key_id=self.id, name=self.name, role=self.role, models=self.models, limits=self.limits)

    def to_dict(self) -> dict[str, object]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "id": self.id,
            "name": self.name,
            "role": str(self.role),
            "models": list(self.models),
            "limits": self.limits.to_dict(),
            "state": self.state(),
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "rotated_at": iso(self.rotated_at),
        }


def database_of(registry: Registry) -> Database:
    """The SQL database the registry keeps its metadata in; keys, usage and the audit log live beside it."""
    db = getattr(registry.store, "db", None)
    if not isinstance(db, Database):
        raise TypeError(f"the registry's store {type(registry.store).__name__} keeps no SQL database for API keys")
    return db


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def split_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key; None otherwise."""
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def check_key_id(key_id: str) -> str:
    if not _ID.fullmatch(key_id):
        raise InvalidInput(f"{key_id!r} is not a key id: ids are 12 hex digits, as `maas keys list` shows them")
    return key_id


def _entity(row: ApiKeyRow) -> ApiKey:
    def at(t: datetime | None) -> datetime | None:
        return utc(t) if t is not None else None

    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        models=tuple(row.models),
        limits=KeyLimits.from_dict(row.limits),
        created_at=utc(row.created_at),
        created_by=row.created_by,
        expires_at=at(row.expires_at),
        revoked_at=at(row.revoked_at),
        rotated_at=at(row.rotated_at),
    )


def _audit(session: Session, action: str, key: ApiKey, before: ApiKey | None = None) -> None:
    from maas.registry.audit import record

    record(session, action, f"key:{key.id}", before=before.to_dict() if before else None, after=key.to_dict())


class KeyStore:
    """The API keys in ``db``; every change is audited in its own transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        name: str,
        role: Role | str,
        *,
        models: list[str] | tuple[str, ...] = (),
        expires_at: datetime | None = None,
        limits: KeyLimits = KeyLimits(),
        created_by: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its whole secret token (the only time the token exists outside its holder)."""
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                f"key name {name!r} is not valid: 1-128 letters, digits, spaces and . _ @ -, starting with a "
                "letter or digit"
            )
        try:
            role = Role(role)
        except ValueError:
            raise InvalidInput(f"role {role!r} is not one of {', '.join(r.value for r in Role)}") from None
        patterns = check_patterns(list(models))
        if role in (Role.CONSUMER, Role.PUBLISHER) and not patterns:
            raise InvalidInput(
                f"a {role} key needs --models: the model-name patterns it may use (e.g. --models 'digits*'); "
                "keys see no model by default"
            )
        for v in limits.to_dict().values():
            if v < 0:
                raise InvalidInput("limits and quotas must be 0 or more")
        if expires_at is not None and expires_at <= now():
            raise InvalidInput("--expires is in the past; give a duration such as 30d or a future date")
        key_id = secrets.token_hex(6)
        secret = _new_secret()

        def write(s: Session) -> ApiKey:
            row = ApiKeyRow(
                id=key_id,
                name=name,
                role=str(role),
                models=list(patterns),
                secret_hash=_hash(secret),
                limits=limits.to_dict(),
                created_at=now(),
                created_by=created_by,
                expires_at=expires_at,
            )
            s.add(row)
            s.flush()
            key = _entity(row)
            _audit(s, "key.create", key)
            return key

        return self.db.write(write), f"{PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        return self.db.read(lambda s: [_entity(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))])

    def get(self, key_id: str) -> ApiKey:
        check_key_id(key_id)

        def read(s: Session) -> ApiKey:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"no API key {key_id!r}; `maas keys list` shows the keys")
            return _entity(row)

        return self.db.read(read)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key for good; revoking a revoked key changes nothing."""
        check_key_id(key_id)

        def write(s: Session) -> ApiKey:
            row = s.get(ApiKeyRow, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no API key {key_id!r}; `maas keys list` shows the keys")
            if row.revoked_at is None:
                before = _entity(row)
                row.revoked_at = now()
                s.flush()
                _audit(s, "key.revoke", _entity(row), before)
            return _entity(row)

        return self.db.write(write)

    def rotate(self, key_id: str) -> tuple[ApiKey, str]:
        """A new secret for a key (same id, role, patterns and limits); the old secret stops working at once."""
        check_key_id(key_id)
        secret = _new_secret()

        def write(s: Session) -> ApiKey:
            row = s.get(ApiKeyRow, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no API key {key_id!r}; `maas keys list` shows the keys")
            key = _entity(row)
            if key.state() != "active":
                raise InvalidInput(f"key {key_id} is {key.state()}; make a new key instead of rotating it")
            row.secret_hash = _hash(secret)
            row.rotated_at = now()
            s.flush()
            _audit(s, "key.rotate", _entity(row), key)
            return _entity(row)

        return self.db.write(write), f"{PREFIX}{key_id}_{secret}"

    def authenticate(self, token: str) -> tuple[ApiKey | None, str]:
        """The key ``token`` belongs to and ``"ok"``; or None and why not (``malformed``, ``unknown``,
        ``revoked``, ``expired``). Unknown ids and wrong secrets read the same."""
        parts = split_token(token)
        if parts is None:
            return None, "malformed"
        key_id, secret = parts

        def read(s: Session) -> tuple[str, ApiKey] | None:
            row = s.get(ApiKeyRow, key_id)
            return None if row is None else (row.secret_hash, _entity(row))

        found = self.db.read(read)
        if found is None or not hmac.compare_digest(found[0], _hash(secret)):
            return None, "unknown"
        key = found[1]
        state = key.state()
        return (key, "ok") if state == "active" else (None, state)
