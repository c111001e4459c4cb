"""job_steps.failed_attempts: the retry budget as a column, not a count of warn events.

A step's failed or lost attempts (a worker that died, a training process that crashed; pauses do
not count) were counted from its warn events carrying `failed_attempt`; the count is now kept on
the step. Existing steps are backfilled from those events.

Revision ID: 7a3e9c2d5b18
Revises: 5c1d0e7a9b42
Create Date: 2026-12-01 01:40:00
"""

import json
from collections import Counter
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a3e9c2d5b18"
down_revision: str | None = "5c1d0e7a9b42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_steps") as batch:
        batch.add_column(sa.Column("failed_attempts", sa.Integer(), nullable=False, server_default="0"))
    conn = op.get_bind()
    events = sa.table("events", sa.column("job_id", sa.String), sa.column("step_index", sa.Integer),
                      sa.column("level", sa.String), sa.column("data", sa.JSON))
    counts: Counter = Counter()
    for job_id, step_index, data in conn.execute(
            sa.select(events.c.job_id, events.c.step_index, events.c.data).where(events.c.level == "warn")):
        if isinstance(data, str):  # a JSON column read without its type on some backends
            data = json.loads(data)
        if step_index is not None and isinstance(data, dict) and data.get("failed_attempt") is not None:
            counts[(job_id, step_index)] += 1
    steps = sa.table("job_steps", sa.column("job_id", sa.String), sa.column("index", sa.Integer),
                     sa.column("failed_attempts", sa.Integer))
    for (job_id, step_index), n in counts.items():
        conn.execute(sa.update(steps).where(steps.c.job_id == job_id, steps.c.index == step_index)
                     .values(failed_attempts=n))


def downgrade() -> None:
    with op.batch_alter_table("job_steps") as batch:
        batch.drop_column("failed_attempts")
