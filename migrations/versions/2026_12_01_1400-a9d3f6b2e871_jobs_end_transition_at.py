"""jobs.end_transition_at: when the worker's end transition of an ended job was done (its stored
trainer state discarded, its integrations told: worker/flows.py, _job_ended), so the reaper can finish
the ones whose sdpo.job_ended message was lost or whose worker died mid-way; a partial index on the
jobs still without it. Jobs that ended before this revision count as done at their end (the reaper
does not replay history).

Revision ID: a9d3f6b2e871
Revises: e4a7b2c9d031
Create Date: 2026-12-01 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a9d3f6b2e871"
down_revision: str | None = "e4a7b2c9d031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "end_transition_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("end_transition_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET end_transition_at = COALESCE(finished_at, updated_at) "
               "WHERE status IN ('succeeded', 'failed', 'cancelled')")
    op.create_index("ix_jobs_end_transition_due", "jobs", ["updated_at"],
                    postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))


def downgrade() -> None:
    op.drop_index("ix_jobs_end_transition_due", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("end_transition_at")
