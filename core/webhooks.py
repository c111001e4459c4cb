"""Webhooks: the outbox of job and step notifications, and how they are signed.

**Outbox.** A `before_flush` listener looks at the jobs and steps whose `status` changed in the
flush (whoever changed it: the API's cancel, the worker's flows, the reaper) and adds one
`WebhookDelivery` row per subscribed webhook of the job's owner, in the same transaction. So a
notification exists exactly when its status change was committed, and no caller of `transition()`
has to remember to send anything. The listener is installed on a session factory by
`install_outbox`, which `core.db.make_session_factory` calls for every factory it makes (the API's,
the worker's, the CLI's, the tests'); importing this module installs nothing. The worker's dispatcher (worker.webhooks) sends
due deliveries and retries failures with exponential backoff.

**Signing** follows the Standard Webhooks scheme (https://www.standardwebhooks.com), so a receiver
can use any of its libraries or `verify_signature` below: headers `webhook-id` (the delivery id),
`webhook-timestamp` (Unix seconds) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` of
`{id}.{timestamp}.{body}` keyed with the base64-decoded part of the `whsec_…` secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from datetime import timedelta
from functools import lru_cache
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import event, inspect
from sqlalchemy.orm import Session, sessionmaker

from core import ids, webhooks_repository
from core.clock import to_unix, utcnow
from core.models import Job, JobStep, Webhook, WebhookDelivery

WEBHOOK_PREFIX = "wh"
DELIVERY_PREFIX = "whdel"
SECRET_PREFIX = "whsec_"

JOB_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
STEP_EVENTS = {"succeeded": "step.succeeded", "failed": "step.failed"}
EVENT_TYPES = (*JOB_EVENTS.values(), *STEP_EVENTS.values())
# The worker's periodic task that sends due deliveries (by name: core never imports the worker).
DELIVER_WEBHOOKS = "sdpo.deliver_webhooks"

# What a delivery's `last_error` may say (None after a 2xx): general classes, never a receiver's
# reply or a connection error's text (a webhook must not be a port scanner or a reader of internal
# replies). `http_3xx` (a redirect, not followed), `http_4xx` and `http_5xx` come with the status code.
DELIVERY_ERROR_CLASSES = ("blocked_address", "dns_error", "connect_refused", "connect_error", "timeout",
                          "tls_error", "protocol_error", "network_error", "invalid_url", "http_1xx", "http_3xx",
                          "http_4xx", "http_5xx", "webhook_deleted")


def delivery_error_class(last_error: str | None, status_code: int | None) -> str | None:
    """`last_error` as shown to the owner: a class of DELIVERY_ERROR_CLASSES. Rows written before
    the classes existed held free text (up to 200 characters of the reply); they show as the class
    of their status code, or `network_error`."""
    if last_error is None or last_error in DELIVERY_ERROR_CLASSES:
        return last_error
    if status_code is not None:
        return f"http_{status_code // 100}xx"
    return "webhook_deleted" if last_error == "the webhook was deleted" else "network_error"


class WebhookSettings(BaseSettings):
    """Delivery tuning, from `SDPO_WEBHOOK_*` environment variables (read by the worker)."""

    model_config = SettingsConfigDict(env_prefix="SDPO_WEBHOOK_", extra="ignore")

    max_attempts: int = Field(8, ge=1, description="Attempts before a delivery is marked failed.")
    retry_base_seconds: float = Field(10.0, gt=0, description="Wait after the first failure; doubles each time.")
    retry_max_seconds: float = Field(3600.0, gt=0, description="Longest wait between two attempts.")
    timeout_seconds: float = Field(10.0, gt=0, description="HTTP timeout of one attempt.")
    dispatch_seconds: float = Field(5.0, gt=0, description="How often the worker's beat looks for due deliveries.")
    batch_size: int = Field(50, ge=1, description="Deliveries sent per dispatch run.")


@lru_cache(maxsize=1)
def webhook_settings() -> WebhookSettings:
    return WebhookSettings()


def retry_delay(attempts: int, settings: WebhookSettings | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: base, 2 base, 4 base, … capped."""
    settings = settings or webhook_settings()
    return min(settings.retry_base_seconds * 2 ** max(attempts - 1, 0), settings.retry_max_seconds)


# ----------------------------------------------------------------------------------------------
# Signing


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message_id, timestamp, body)}


class InvalidSignature(ValueError):
    """A webhook request that was not signed with the expected secret (or is too old)."""


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_seconds: int = 300,
                     now: float | None = None) -> None:
    """Check a received webhook (for receivers); raises `InvalidSignature`. `headers` lookups are
    case-insensitive when given a case-insensitive mapping (e.g. http.server's or Starlette's)."""
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (message_id and timestamp and signatures):
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(timestamp)
    except ValueError:
        raise InvalidSignature("bad webhook-timestamp") from None
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_seconds:
        raise InvalidSignature("webhook-timestamp outside the tolerance (replayed or clock skew)")
    expected = sign(secret, message_id, ts, body)
    # The header may carry several space-separated signatures (secret rotation).
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        raise InvalidSignature("no signature matches")


# ----------------------------------------------------------------------------------------------
# Payloads


def job_payload(job: Job) -> dict[str, Any]:
    return {"id": job.id, "object": "fine_tuning.job", "status": job.status, "model": job.model,
            "fine_tuned_model": job.fine_tuned_model, "n_steps": job.n_steps, "current_step": job.current_step,
            "error": job.error, "metadata": job.metadata_, "created_at": to_unix(job.created_at),
            "finished_at": to_unix(job.finished_at), "gate": job.gate}


def step_payload(step: JobStep) -> dict[str, Any]:
    return {"object": "fine_tuning.job.step", "fine_tuning_job_id": step.job_id, "index": step.index,
            "status": step.status, "attempt": step.attempt, "reference_checkpoint": step.reference_checkpoint_id,
            "output_checkpoint": step.output_checkpoint_id, "metrics": step.metrics, "error": step.error,
            "finished_at": to_unix(step.finished_at)}


def envelope(delivery_id: str, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": delivery_id, "object": "event", "type": event_type, "created_at": int(time.time()),
            "data": data}


# ----------------------------------------------------------------------------------------------
# The outbox listener


def _new_status(obj) -> str | None:
    """The status `obj` gets in this flush, if it changed (None for new rows and unchanged ones)."""
    state = inspect(obj)
    if state.pending:
        return None
    history = state.attrs.status.history
    if not history.added:
        return None
    new = history.added[0]
    if history.deleted and history.deleted[0] == new:
        return None
    return new


def _subscribers(session: Session, owner: str, event_type: str, cache: dict) -> list[Webhook]:
    if owner not in cache:
        cache[owner] = webhooks_repository.subscribed_webhooks(session, owner)
    return [w for w in cache[owner] if event_type in (w.events or ())]


def install_outbox(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Make every session of `factory` write the outbox (idempotent); returns `factory`.

    Listening on the factory, not on the `Session` class: a session made elsewhere (a bare
    `sessionmaker`, a migration) writes no deliveries, and nothing depends on what was imported.
    """
    if not event.contains(factory, "before_flush", _record_status_changes):
        event.listen(factory, "before_flush", _record_status_changes)
    return factory


def _record_status_changes(session: Session, _flush_context, _instances) -> None:
    changed = [o for o in session.dirty if isinstance(o, Job | JobStep)]
    if not changed:
        return
    notes: list[tuple[str, Job, JobStep | None]] = []
    with session.no_autoflush:
        for obj in changed:
            status = _new_status(obj)
            if isinstance(obj, Job) and status in JOB_EVENTS:
                notes.append((JOB_EVENTS[status], obj, None))
            elif isinstance(obj, JobStep) and status in STEP_EVENTS:
                job = session.get(Job, obj.job_id)
                if job is not None:
                    notes.append((STEP_EVENTS[status], job, obj))
        if not notes:
            return
        # Steps first, then jobs, in step order: the order a receiver expects to hear about them.
        notes.sort(key=lambda n: (n[2] is None, n[2].index if n[2] is not None else 0))
        cache: dict[str, list[Webhook]] = {}
        now = utcnow()
        for n, (event_type, job, step) in enumerate(notes):
            # Distinct times keep the dispatcher's (created_at, id) order the order of the changes.
            at = now + timedelta(microseconds=n)
            for hook in _subscribers(session, job.owner, event_type, cache):
                delivery_id = ids.new_id(DELIVERY_PREFIX)
                data = {"job": job_payload(job)}
                if step is not None:
                    data["step"] = step_payload(step)
                session.add(WebhookDelivery(
                    id=delivery_id, webhook_id=hook.id, owner=job.owner, event_type=event_type, job_id=job.id,
                    step_index=step.index if step is not None else None,
                    payload=envelope(delivery_id, event_type, data), status="pending", attempts=0,
                    next_attempt_at=at, created_at=at))
