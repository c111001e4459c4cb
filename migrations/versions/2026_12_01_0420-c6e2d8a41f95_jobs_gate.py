"""jobs.gate: a gated sDPO job's outcome (core/jobs/gates.py), shown on the job object and in the
job.succeeded webhook. Existing jobs have none (NULL).

Revision ID: c6e2d8a41f95
Revises: 9d4c2a7e5f13
Create Date: 2026-12-01 04:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c6e2d8a41f95"
down_revision: str | None = "9d4c2a7e5f13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gate")
