"""Job events: messages and metrics, listed newest first like OpenAI's."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base, BigIntPK

# `data.checkpoint_cache` ("hit" | "miss"): the worker's event saying whether a step's initial
# checkpoint was in its host's cache (worker/flows.py); `->>` reads it as text on Postgres and SQLite.
CACHE_FIELD = "(data ->> 'checkpoint_cache')"


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_job_id_seq", "job_id", "seq"),
        # /metrics counts the steps' checkpoint-cache events by this field at every scrape: a
        # partial index holds only those events (one per step), not every message and metric.
        Index("ix_events_checkpoint_cache", text(CACHE_FIELD),
              postgresql_where=text(f"{CACHE_FIELD} IS NOT NULL"), sqlite_where=text(f"{CACHE_FIELD} IS NOT NULL")),
    )

    # An increasing integer orders events (timestamps tie, and random ids do not sort), so that
    # `after=<event id>` pagination is stable. It is the primary key because SQLite only
    # auto-increments a primary key.
    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_index: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None]
