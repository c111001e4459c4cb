"""Webhooks: an owner registers URLs that receive signed job.* and step.* notifications.

The notifications themselves are written by the outbox listener in core.webhooks and sent by the
worker; this module only manages the registrations and shows their deliveries.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.deps import AppServices, Principal
from api.pagination import check_limit
from api.webhooks import repository
from api.webhooks.schemas import WebhookCreate
from core import ids
from core.clock import utcnow
from core.errors import InvalidRequest, NotFound
from core.models import Webhook, WebhookDelivery
from core.netguard import Allowance, UnsafeURL, check_url
from core.webhooks import EVENT_TYPES, WEBHOOK_PREFIX, new_secret

MAX_WEBHOOKS_PER_OWNER = 20
MAX_URL_LENGTH = 2048


def _check_url(url: str, allowance: Allowance) -> str:
    """The URL as given (stripped), if it is an absolute http(s) URL without credentials whose
    host is not internal on its face (core.netguard.check_url; the worker checks the resolved
    addresses again at every delivery). Raises InvalidRequest (400, param "url")."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"url must be an absolute http(s) URL of at most {MAX_URL_LENGTH} characters.",
                             param="url", code="invalid_url")
    try:
        parsed = check_url(url, allowance)
    except UnsafeURL as exc:
        raise InvalidRequest(str(exc), param="url", code=exc.code) from None
    if parsed.userinfo:
        raise InvalidRequest("url must not carry credentials; check the signature instead.", param="url",
                             code="invalid_url")
    return url


def _check_events(events: list[str] | None) -> list[str]:
    if events is None:
        return list(EVENT_TYPES)
    if not events:
        raise InvalidRequest("events must name at least one event type.", param="events", code="invalid_value")
    for i, name in enumerate(events):
        if name not in EVENT_TYPES:
            raise InvalidRequest(f"Unknown event type {name!r}; expected one of {', '.join(EVENT_TYPES)}.",
                                 param=f"events[{i}]", code="invalid_value")
    return [e for e in EVENT_TYPES if e in set(events)]


def create_webhook(db: Session, services: AppServices, principal: Principal, body: WebhookCreate) -> Webhook:
    """Register a webhook and return it; the response to this request is the only one that shows its
    secret. Raises InvalidRequest
    (400) for a bad or internal `url` (see `_check_url`), bad `events` or `description`, or more than
    MAX_WEBHOOKS_PER_OWNER webhooks."""
    url = _check_url(body.url, Allowance.parse(services.settings.webhook_allowed_private_networks))
    events = _check_events(body.events)
    if body.description is not None and len(body.description) > 255:
        raise InvalidRequest("description must be at most 255 characters.", param="description")
    if repository.count_active(db, principal.owner) >= MAX_WEBHOOKS_PER_OWNER:
        raise InvalidRequest(f"An owner may register at most {MAX_WEBHOOKS_PER_OWNER} webhooks.",
                             code="too_many_webhooks")
    row = Webhook(id=ids.new_id(WEBHOOK_PREFIX), owner=principal.owner, url=url, secret=new_secret(),
                  events=events, description=body.description)
    db.add(row)
    db.flush()
    return row


def find(db: Session, principal: Principal, webhook_id: str) -> Webhook:
    row = repository.get_active(db, principal.owner, webhook_id)
    if row is None:
        raise NotFound(f"No webhook found with id {webhook_id}.", param="webhook_id", code="webhook_not_found")
    return row


def list_webhooks(db: Session, principal: Principal) -> list[Webhook]:
    """The owner's webhooks that are not deleted, newest first."""
    return repository.list_active(db, principal.owner)


def delete_webhook(db: Session, principal: Principal, webhook_id: str) -> Webhook:
    row = find(db, principal, webhook_id)
    # Kept (soft-deleted) so its delivery history stays readable; the dispatcher drops its
    # pending deliveries.
    row.deleted_at = utcnow()
    db.flush()
    return row


def list_deliveries(db: Session, principal: Principal, webhook_id: str, *,
                    limit: int | None) -> tuple[list[WebhookDelivery], bool]:
    """(the webhook's deliveries, newest first, whether more follow)."""
    row = find(db, principal, webhook_id)
    limit = check_limit(limit, default=20, maximum=100)
    return repository.deliveries_page(db, row.id, limit=limit)
