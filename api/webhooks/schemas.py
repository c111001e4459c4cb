"""Request and response shapes of /v1/webhooks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from core.clock import to_unix
from core.models import Webhook, WebhookDelivery
from core.text import clean_optional_name
from core.webhooks import EVENT_TYPES, delivery_error_class


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr = Field(description="An http(s) URL on a public address that receives a signed POST per "
                           "event (internal hosts are refused unless the admin allows them).")
    events: list[StrictStr] | None = Field(
        None, description=f"Event types to receive (default all): {', '.join(EVENT_TYPES)}.")
    description: StrictStr | None = Field(None, description="A label for the webhook (up to 255 characters; "
                                          "control and format characters are removed).")

    _clean_description = field_validator("description")(clean_optional_name)


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[str]
    description: str | None
    created_at: int
    secret: str | None = Field(
        None, description="The signing secret: only in the response that creates it (null in a replay of that "
        "request with the same Idempotency-Key, in lists and lookups).")

    @classmethod
    def from_row(cls, row: Webhook, *, with_secret: bool = False) -> WebhookObject:
        return cls(id=row.id, url=row.url, events=list(row.events or []), description=row.description,
                   created_at=to_unix(row.created_at), secret=row.secret if with_secret else None)


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookObject]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: bool


class DeliveryObject(BaseModel):
    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    event_type: str
    fine_tuning_job_id: str | None
    step_index: int | None
    status: str
    attempts: int
    next_attempt_at: int | None
    last_status_code: int | None
    last_error: str | None = Field(description="Why the last attempt failed, as a general class: blocked_address "
                                   "(not a public address), dns_error, connect_refused, connect_error, timeout, "
                                   "tls_error, protocol_error, network_error, http_3xx/4xx/5xx (see "
                                   "last_status_code), webhook_deleted. Never the receiver's reply.")
    created_at: int
    delivered_at: int | None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> DeliveryObject:
        return cls(id=row.id, webhook_id=row.webhook_id, event_type=row.event_type, fine_tuning_job_id=row.job_id,
                   step_index=row.step_index, status=row.status, attempts=row.attempts,
                   next_attempt_at=to_unix(row.next_attempt_at) if row.status == "pending" else None,
                   last_status_code=row.last_status_code,
                   last_error=delivery_error_class(row.last_error, row.last_status_code),
                   created_at=to_unix(row.created_at), delivered_at=to_unix(row.delivered_at))


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryObject]
    has_more: bool


def without_secret(body: dict[str, Any]) -> dict[str, Any]:
    """A created webhook's response as stored for Idempotency-Key replays: the secret left out."""
    return {**body, "secret": None}
