"""HTTP only: parse, call the service, respond."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import AppServices, Principal, get_db, get_principal, get_services, json_body, require_admin
from api.errors import from_validation_errors
from api.idempotency import respond
from api.models import service
from api.models.schemas import ModelDeleted, ModelList, ModelObject, ModelRegister
from api.openapi import json_body_doc

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return ModelList(data=[ModelObject.from_row(r) for r in service.list_models(db, principal)])


@router.get("/{model_id}", response_model=ModelObject)
def retrieve_model(model_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return ModelObject.from_row(service.get_model(db, principal, model_id))


@router.delete("/{model_id}", response_model=ModelDeleted,
               summary="Delete one of your fine-tuned models (its job and checkpoints stay)")
def delete_model(model_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return ModelDeleted(id=service.delete_model(db, principal, model_id).id, deleted=True)


@router.post("", response_model=ModelObject, summary="Register a model on the server's disk (admin)",
             openapi_extra=json_body_doc(ModelRegister))
def register_model(
    request: Request,
    principal: Principal = Depends(require_admin),  # before the body: auth errors come first
    payload: Any = Depends(json_body),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
):
    try:
        body = ModelRegister.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
    return respond(request, db, principal, payload,
                   lambda: ModelObject.from_row(service.register_model(db, services, principal, body)))
