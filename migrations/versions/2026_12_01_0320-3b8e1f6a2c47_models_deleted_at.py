"""models.deleted_at: an owner deletes a fine-tuned model (DELETE /v1/models/{model}).

The row stays (jobs keep naming it as their model, and the job and checkpoints that made it
stay); a set deleted_at hides it from listings and from new jobs.

Revision ID: 3b8e1f6a2c47
Revises: 7a3e9c2d5b18
Create Date: 2026-12-01 03:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3b8e1f6a2c47"
down_revision: str | None = "7a3e9c2d5b18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("deleted_at")
