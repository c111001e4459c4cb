"""Every query of the webhook outbox: core.webhooks (writing it) and worker.webhooks (draining it). The
API's own webhook queries are in api/webhooks/repository.py."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Webhook, WebhookDelivery


def subscribed_webhooks(session: Session, owner: str) -> list[Webhook]:
    """`owner`'s webhooks that are not deleted, whatever events they subscribe to."""
    return list(session.scalars(select(Webhook).where(Webhook.owner == owner, Webhook.deleted_at.is_(None))))


def due_deliveries(session: Session, now: datetime, limit: int) -> list[WebhookDelivery]:
    """At most `limit` pending deliveries whose `next_attempt_at` is at or before `now` (aware UTC),
    oldest first, locked for this transaction. On Postgres rows another dispatcher holds are skipped
    (FOR UPDATE SKIP LOCKED), so two dispatchers never claim the same delivery; SQLite has one writer."""
    query = (select(WebhookDelivery)
             .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
             .order_by(WebhookDelivery.created_at, WebhookDelivery.id).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def webhook(session: Session, webhook_id: str) -> Webhook | None:
    """The webhook `webhook_id` (deleted ones too: `deleted_at` says so), None if there is no such row."""
    return session.get(Webhook, webhook_id)


def locked_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    """The delivery `delivery_id` locked for this transaction (FOR UPDATE), None if there is none."""
    return session.get(WebhookDelivery, delivery_id, with_for_update=True)
