"""deployments: how servers serve each model (batching, queueing, instances, threads)

Revision ID: 0004_deployments
Revises: 0003_run_evals
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_deployments"
down_revision = "0003_run_evals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column(
            "model_id",
            sa.Integer(),
            sa.ForeignKey("registered_models.id", ondelete="CASCADE"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("max_batch_size", sa.Integer(), nullable=False),
        sa.Column("max_queue_delay_ms", sa.Float(), nullable=False),
        sa.Column("preferred_batch_sizes", sa.JSON(), nullable=False),
        sa.Column("max_queue_size", sa.Integer(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
