"""jobs.integrations: OpenAI's `integrations` (wandb, and mlflow), echoed on the job and read by
the worker's tracking (worker/tracking.py). Existing jobs have none (NULL, echoed as []).

Revision ID: 9d4c2a7e5f13
Revises: 3b8e1f6a2c47
Create Date: 2026-12-01 03:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d4c2a7e5f13"
down_revision: str | None = "3b8e1f6a2c47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("integrations", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("integrations")
