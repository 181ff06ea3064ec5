"""ORM tables of access control, kept in the registry's database: API keys, the hash-chained audit log, usage
per minute, and the counters rate limits and quotas share across processes. Like :mod:`maas.registry.schema`,
these classes never leave the store modules; the schema is created only by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from maas.registry.schema import Base


class ApiKeyRow(Base):
    """An API key. Only a hash of its secret is kept; ``id`` is public (it names the key in logs and usage)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    #: Model-name patterns (fnmatch) the key may use; empty: none (an admin key ignores them).
    models: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    #: sha256 of the secret (hex); secrets are 32 random bytes, so a fast hash is enough.
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    #: rpm, tpm, concurrent, quota_requests_day, quota_tokens_month (absent: unlimited).
    limits: Mapped[dict[str, int]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditRow(Base):
    """One audited mutation. ``hash`` = sha256 over the entry's canonical form and ``prev_hash`` (the previous
    row's ``hash``), so an edited, deleted or reordered row breaks the chain."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str] = mapped_column(String(256), nullable=False)
    before: Mapped[Any] = mapped_column(JSON, nullable=True)
    after: Mapped[Any] = mapped_column(JSON, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class UsageRow(Base):
    """What one key did with one model version in one minute (UTC, truncated); rows are added to, never rewritten
    from memory."""

    __tablename__ = "usage_minutes"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "-" when auth is off
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: not resolved (e.g. refused)
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True, index=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    items: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    compute_s: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)


class LimitCounterRow(Base):
    """A rate-limit or quota window of one key: ``bucket`` names the kind and the window (``rpm:29384756``,
    ``day:2026-12-02``); deleted after ``expires_at``."""

    __tablename__ = "limit_counters"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(48), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


class LeaseRow(Base):
    """A request in flight for a key with a concurrency limit; a lease a crashed process left expires."""

    __tablename__ = "limit_leases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
