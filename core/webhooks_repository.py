"""Every query core.webhooks makes (the API's own webhook queries are in api/webhooks/repository.py)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Webhook


def subscribed_webhooks(session: Session, owner: str) -> list[Webhook]:
    """`owner`'s webhooks that are not deleted, whatever events they subscribe to."""
    return list(session.scalars(select(Webhook).where(Webhook.owner == owner, Webhook.deleted_at.is_(None))))
