"""Sending webhook deliveries: the outbox written by core.webhooks, drained by a periodic task.

`sdpo.deliver_webhooks` runs from the beat schedule (worker.app) every few seconds. It claims the
due deliveries (a lease: their `next_attempt_at` moves past the HTTP timeout, and Postgres skips
rows another dispatcher has locked), POSTs each one signed, and records the answer: a 2xx is
`delivered`; anything else is retried after `retry_delay(attempts)` (exponential backoff) until
`max_attempts`, then `failed`. Delivery is at least once: a receiver deduplicates on `webhook-id`.

Importing this module also turns on JSON logs with job and step ids for the worker's tasks.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import httpx
from sqlalchemy import select

from core.clock import utcnow
from core.logging import install_celery_logging, log_context
from core.models import Webhook, WebhookDelivery
from core.webhooks import DELIVER_WEBHOOKS, retry_delay, signed_headers, webhook_settings
from worker import db
from worker.app import app

log = logging.getLogger(__name__)

install_celery_logging()

USER_AGENT = "sdpo-webhooks/1"


def _claim(limit: int) -> list[tuple[str, str, str, dict, str, str | None, int | None]]:
    settings = webhook_settings()
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.timeout_seconds + 30)
    claimed = []
    with db.session() as s:
        query = (select(WebhookDelivery)
                 .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                 .order_by(WebhookDelivery.created_at, WebhookDelivery.id).limit(limit))
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        for row in s.scalars(query):
            hook = s.get(Webhook, row.webhook_id)
            if hook is None or hook.deleted_at is not None:
                row.status, row.last_error = "failed", "the webhook was deleted"
                continue
            row.next_attempt_at = lease_until  # claimed until the lease ends
            claimed.append((row.id, hook.url, hook.secret, row.payload, row.event_type, row.job_id, row.step_index))
    return claimed


def _record(delivery_id: str, status_code: int | None, error: str | None) -> str:
    settings = webhook_settings()
    with db.session() as s:
        row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
        if row is None or row.status != "pending":
            return row.status if row else "gone"
        row.attempts += 1
        row.last_status_code = status_code
        row.last_error = error
        now = utcnow()
        if error is None:
            row.status, row.delivered_at = "delivered", now
        elif row.attempts >= settings.max_attempts:
            row.status = "failed"
        else:
            row.next_attempt_at = now + timedelta(seconds=retry_delay(row.attempts, settings))
        return row.status


def deliver_due(*, limit: int | None = None) -> int:
    """Send every due delivery once; returns how many were delivered."""
    settings = webhook_settings()
    claimed = _claim(limit or settings.batch_size)
    if not claimed:
        return 0
    delivered = 0
    with httpx.Client(timeout=settings.timeout_seconds, follow_redirects=False) as http:
        for delivery_id, url, secret, payload, event_type, job_id, step in claimed:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            headers = {"content-type": "application/json", "user-agent": USER_AGENT, "x-sdpo-event": event_type,
                       **signed_headers(secret, delivery_id, body)}
            status_code, error = None, None
            try:
                response = http.post(url, content=body, headers=headers)
                status_code = response.status_code
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            outcome = _record(delivery_id, status_code, error)
            delivered += outcome == "delivered"
            with log_context(job_id, step):
                log.info("webhook %s %s: %s", event_type, delivery_id,
                         outcome if error is None else f"{outcome} ({error})",
                         extra={"delivery_id": delivery_id, "status_code": status_code})
    return delivered


@app.task(name=DELIVER_WEBHOOKS, ignore_result=True)
def deliver_webhooks() -> int:
    return deliver_due()
