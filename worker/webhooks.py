"""Sending webhook deliveries: the outbox written by core.webhooks, drained by a periodic task.

`sdpo.deliver_webhooks` runs from the beat schedule (worker.app) every few seconds. It claims the
due deliveries (a lease: their `next_attempt_at` moves past the HTTP timeout, and Postgres skips
rows another dispatcher has locked), POSTs each one signed, and records the answer: a 2xx is
`delivered`; anything else is retried after `retry_delay(attempts)` (exponential backoff) until
`max_attempts`, then `failed`. Delivery is at least once: a receiver deduplicates on `webhook-id`.

Requests go through `core.netguard.GuardedTransport`: the receiver's host is resolved once per
connection, refused (`blocked_address`) if any of its addresses is not public (unless the admin's
SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS allows it), and the connection goes to the address checked.
Redirects are not followed. What is recorded (and shown to the owner) is the status code and a
general error class (`core.webhooks.DELIVERY_ERROR_CLASSES`), never the receiver's reply nor the connection error's
text: a webhook must not work as a port scanner or a reader of other hosts' replies. The reply's
body is not even read.

Importing this module also turns on JSON logs with job and step ids for the worker's tasks.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from datetime import timedelta

import httpx

from core import webhooks_repository as repository
from core.clock import utcnow
from core.logging import install_celery_logging, log_context
from core.netguard import Allowance, BlockedAddress, GuardedTransport
from core.settings import get_settings
from core.webhooks import DELIVER_WEBHOOKS, retry_delay, signed_headers, webhook_settings
from worker import db
from worker.app import app

log = logging.getLogger(__name__)

install_celery_logging()

USER_AGENT = "sdpo-webhooks/1"

def error_class(exc: BaseException) -> str:
    """The general class of a failed attempt (one of core.webhooks.DELIVERY_ERROR_CLASSES), from the
    exception and its causes."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for kind, name in ((BlockedAddress, "blocked_address"), (ssl.SSLError, "tls_error"),
                       (ssl.CertificateError, "tls_error"), (socket.gaierror, "dns_error"),
                       (ConnectionRefusedError, "connect_refused"), (httpx.TimeoutException, "timeout"),
                       (TimeoutError, "timeout"), (httpx.InvalidURL, "invalid_url"),
                       (httpx.UnsupportedProtocol, "invalid_url"), (httpx.ConnectError, "connect_error"),
                       (httpx.ProtocolError, "protocol_error")):
        if any(isinstance(e, kind) for e in chain):
            return name
    return "network_error"


def _claim(limit: int) -> list[tuple[str, str, str, dict, str, str | None, int | None]]:
    settings = webhook_settings()
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.timeout_seconds + 30)
    claimed = []
    with db.session() as s:
        for row in repository.due_deliveries(s, now, limit):
            hook = repository.webhook(s, row.webhook_id)
            if hook is None or hook.deleted_at is not None:
                row.status, row.last_error = "failed", "webhook_deleted"
                continue
            row.next_attempt_at = lease_until  # claimed until the lease ends
            claimed.append((row.id, hook.url, hook.secret, row.payload, row.event_type, row.job_id, row.step_index))
    return claimed


def _record(delivery_id: str, status_code: int | None, error: str | None) -> str:
    settings = webhook_settings()
    with db.session() as s:
        row = repository.locked_delivery(s, delivery_id)
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


def deliver_due(*, limit: int | None = None, transport: httpx.BaseTransport | None = None) -> int:
    """Send every due delivery once; returns how many were delivered. `transport` defaults to a
    `GuardedTransport` with the admin's allowance (SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS)."""
    settings = webhook_settings()
    claimed = _claim(limit or settings.batch_size)
    if not claimed:
        return 0
    transport = transport or GuardedTransport(Allowance.parse(get_settings().webhook_allowed_private_networks))
    delivered = 0
    with httpx.Client(transport=transport, timeout=settings.timeout_seconds, follow_redirects=False,
                      trust_env=False) as http:
        for delivery_id, url, secret, payload, event_type, job_id, step in claimed:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            headers = {"content-type": "application/json", "user-agent": USER_AGENT, "x-sdpo-event": event_type,
                       **signed_headers(secret, delivery_id, body)}
            status_code, error, cause = None, None, None
            try:
                # Streamed and closed unread: only the status code counts, and a huge reply costs nothing.
                with http.stream("POST", url, content=body, headers=headers) as response:
                    status_code = response.status_code
                if not 200 <= status_code < 300:
                    error = f"http_{status_code // 100}xx"
            except (httpx.HTTPError, httpx.InvalidURL, BlockedAddress) as exc:
                error, cause = error_class(exc), type(exc).__name__
            outcome = _record(delivery_id, status_code, error)
            delivered += outcome == "delivered"
            with log_context(job_id, step):
                log.info("webhook %s %s: %s", event_type, delivery_id,
                         outcome if error is None else f"{outcome} ({error})",
                         extra={"delivery_id": delivery_id, "status_code": status_code, "error_class": error,
                                "exception": cause})
    return delivered


@app.task(name=DELIVER_WEBHOOKS, ignore_result=True)
def deliver_webhooks() -> int:
    return deliver_due()
