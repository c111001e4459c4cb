"""HTTP only: parse, call the service, respond."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import AppServices, Principal, get_db, get_principal, get_services, json_body
from api.errors import from_validation_errors
from api.idempotency import respond
from api.openapi import json_body_doc
from api.webhooks import service
from api.webhooks.schemas import (
    DeliveryList,
    DeliveryObject,
    WebhookCreate,
    WebhookDeleted,
    WebhookList,
    WebhookObject,
    without_secret,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", response_model=WebhookObject, openapi_extra=json_body_doc(WebhookCreate),
             summary="Register a URL for signed job.* and step.* notifications (the secret is shown once)")
def create_webhook(
    request: Request,
    principal: Principal = Depends(get_principal),  # before the body: auth errors come first
    payload: Any = Depends(json_body),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
):
    try:
        body = WebhookCreate.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
    # A replay (same Idempotency-Key) shows the webhook without its secret: the secret is shown once and
    # never stored outside the webhook's row.
    return respond(request, db, principal, payload,
                   lambda: WebhookObject.from_row(service.create_webhook(db, services, principal, body), with_secret=True),
                   stored_body=without_secret)


@router.get("", response_model=WebhookList)
def list_webhooks(principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return WebhookList(data=[WebhookObject.from_row(r) for r in service.list_webhooks(db, principal)],
                       has_more=False)


@router.get("/{webhook_id}", response_model=WebhookObject)
def retrieve_webhook(webhook_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return WebhookObject.from_row(service.find(db, principal, webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(webhook_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return WebhookDeleted(id=service.delete_webhook(db, principal, webhook_id).id, deleted=True)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList,
            summary="The webhook's deliveries, newest first: status, attempts, last response")
def list_deliveries(
    webhook_id: str,
    limit: int | None = Query(None, description="1 to 100 (default 20)."),
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
):
    rows, has_more = service.list_deliveries(db, principal, webhook_id, limit=limit)
    return DeliveryList(data=[DeliveryObject.from_row(d) for d in rows], has_more=has_more)
