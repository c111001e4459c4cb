"""Webhooks an owner registered, and the outbox of deliveries to them.

A delivery row is written in the same transaction as the job or step status change it reports
(see core.webhooks): if that transaction rolls back, no notification exists; if it commits, the
notification cannot be lost, and the worker's dispatcher sends it (with retries) later.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class Webhook(Base):
    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    # The HMAC signing secret (`whsec_…`). Stored in plain text because the server must sign with
    # it; it grants nothing on this API. Shown to the owner only in the response that creates it.
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list]  # event types delivered, e.g. ["job.succeeded", "step.failed"]
    description: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]  # deleted webhooks keep their row for their deliveries


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The dispatcher's query: pending deliveries that are due.
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id_created_at", "webhook_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))  # job.succeeded, step.failed, …
    job_id: Mapped[str | None] = mapped_column(String(40))
    step_index: Mapped[int | None]
    payload: Mapped[dict]  # the JSON body sent, built when the status changed
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
