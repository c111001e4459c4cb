"""Every query on webhooks and their deliveries made by the API."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import Webhook, WebhookDelivery


def list_active(db: Session, owner: str) -> list[Webhook]:
    query = select(Webhook).where(Webhook.owner == owner, Webhook.deleted_at.is_(None))
    return list(db.scalars(query.order_by(Webhook.created_at.desc(), Webhook.id.desc())))


def count_active(db: Session, owner: str) -> int:
    return db.scalar(select(func.count()).select_from(Webhook).where(
        Webhook.owner == owner, Webhook.deleted_at.is_(None))) or 0


def get_active(db: Session, owner: str, webhook_id: str) -> Webhook | None:
    return db.scalars(select(Webhook).where(Webhook.id == webhook_id, Webhook.owner == owner,
                                            Webhook.deleted_at.is_(None))).first()


def deliveries_page(db: Session, webhook_id: str, *, limit: int) -> tuple[list[WebhookDelivery], bool]:
    """Newest first."""
    query = (select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
             .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit + 1))
    rows = list(db.scalars(query))
    return rows[:limit], len(rows) > limit


def count_deliveries_by_status(db: Session) -> dict[str, int]:
    """{status: deliveries}, every owner's; statuses without a delivery are left out."""
    query = select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    return {status: count for status, count in db.execute(query)}
