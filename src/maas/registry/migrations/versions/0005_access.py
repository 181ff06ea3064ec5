"""access: API keys, the hash-chained audit log, usage per minute, rate-limit counters and leases

Revision ID: 0005_access
Revises: 0004_deployments
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_access"
down_revision = "0004_deployments"
branch_labels = None
depends_on = None


def _at(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        _at("created_at"),
        sa.Column("created_by", sa.String(128), nullable=True),
        _at("expires_at", True),
        _at("revoked_at", True),
        _at("rotated_at", True),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("client", sa.String(128), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "usage_minutes",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("items", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("compute_s", sa.Float(), nullable=False),
    )
    op.create_table(
        "limit_counters",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("bucket", sa.String(48), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "limit_leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        _at("expires_at"),
    )
    for table, column in (
        ("api_keys", "name"),
        ("audit_log", "at"),
        ("audit_log", "actor"),
        ("usage_minutes", "minute"),
        ("limit_counters", "expires_at"),
        ("limit_leases", "key_id"),
    ):
        op.create_index(f"ix_{table}_{column}", table, [column])


def downgrade() -> None:
    for table in ("limit_leases", "limit_counters", "usage_minutes", "audit_log", "api_keys"):
        op.drop_table(table)
