"""events: a partial index on data->>'checkpoint_cache', so /metrics counts the steps' checkpoint
cache hits and misses (sdpo_checkpoint_cache_total) from that field at every scrape without
reading every event.

Revision ID: e4a7b2c9d031
Revises: c6e2d8a41f95
Create Date: 2026-12-01 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e4a7b2c9d031"
down_revision: str | None = "c6e2d8a41f95"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIELD = "(data ->> 'checkpoint_cache')"


def upgrade() -> None:
    op.create_index("ix_events_checkpoint_cache", "events", [sa.text(FIELD)],
                    postgresql_where=sa.text(f"{FIELD} IS NOT NULL"), sqlite_where=sa.text(f"{FIELD} IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_events_checkpoint_cache", table_name="events")
