"""run_evals: a run's evaluation metrics at the steps it was evaluated

Revision ID: 0003_run_evals
Revises: 0002_runs
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_run_evals"
down_revision = "0002_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_evals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "step", name="uq_run_evals_run_step"),
    )


def downgrade() -> None:
    op.drop_table("run_evals")
