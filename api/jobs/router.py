"""HTTP only: parse, call the service, respond."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import AppServices, Principal, get_db, get_principal, get_services, json_body
from api.errors import from_validation_errors
from api.idempotency import respond
from api.jobs import service
from api.jobs.schemas import CheckpointList, EventList, JobCreate, JobList, JobObject, StepList, StepSamples
from api.openapi import json_body_doc
from api.presign import PresignParams, expires_at, presign_params, require_presigning, tree_body
from api.stream import EventStreamResponse, job_event_stream, open_streams

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("", response_model=JobObject, openapi_extra=json_body_doc(JobCreate),
             summary="Create a dpo (one step) or sdpo (stepwise) fine-tuning job")
def create_job(
    request: Request,
    principal: Principal = Depends(get_principal),  # before the body: auth errors come first
    payload: Any = Depends(json_body),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
):
    try:
        body = JobCreate.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
    return respond(request, db, principal, payload,
                   lambda: service.job_with_progress(db, service.create_job(db, services, principal, body)))


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    after: str | None = None,
    limit: int | None = Query(None, description="1 to 100 (default 20)."),
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
):
    metadata = service.metadata_filter(request.query_params.multi_items())
    rows, progress, has_more = service.list_jobs(db, principal, after=after, limit=limit, metadata=metadata)
    return JobList.from_rows(rows, progress, has_more=has_more)


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(job_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return service.job_with_progress(db, service.find_job(db, principal, job_id))


def _state_route(action: str, summary: str):
    def change(
        job_id: str,
        request: Request,
        principal: Principal = Depends(get_principal),
        db: Session = Depends(get_db),
        services: AppServices = Depends(get_services),
    ):
        return respond(request, db, principal, {"action": action}, lambda: service.job_with_progress(
            db, service.change_state(db, services, principal, job_id, action)))

    change.__name__ = f"{action}_job"
    router.add_api_route(f"/{{job_id}}/{action}", change, methods=["POST"], response_model=JobObject,
                         summary=summary)


_state_route("cancel", "Cancel a job now; unfinished steps are cancelled and a running one is stopped")
_state_route("pause", "Pause a job (queued: at once; running: after the step saves its state)")
_state_route("resume", "Resume a paused job from its first unfinished step")


@router.get("/{job_id}/events", response_model=EventList,
            responses={200: {"content": {"text/event-stream": {}}}},
            summary="List a job's events (newest first), or follow them live with stream=true (server-sent events)")
def list_events(
    job_id: str,
    request: Request,
    after: str | None = None,
    limit: int | None = Query(None, description="1 to 100 (default 20)."),
    stream: bool = Query(False, description="Server-sent events, oldest first, until the job ends; "
                                            "resume after the `Last-Event-ID` header's event."),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
):
    if stream:
        after_seq = service.stream_start(db, principal, job_id, last_event_id)
        db.close()  # the stream polls with short sessions of its own; hold no connection meanwhile
        release = open_streams(request.app).acquire(principal.key_id, services.settings.max_streams_per_key)
        return EventStreamResponse(job_event_stream(services.session_factory, job_id, after_seq,
                                                    key_id=principal.key_id, owner=principal.owner), release)
    rows, has_more = service.list_events(db, principal, job_id, after=after, limit=limit)
    return EventList.from_rows(rows, has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str,
    after: str | None = None,
    limit: int | None = Query(None, description="1 to 100 (default 10)."),
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
):
    job, rows, has_more = service.list_checkpoints(db, principal, job_id, after=after, limit=limit)
    return CheckpointList.page(rows, job, has_more=has_more)


@router.get("/{job_id}/checkpoints/{checkpoint_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}, "application/json": {}}}},
            summary="Download a checkpoint directory as a tar stream (or presigned URLs, one per file)")
def checkpoint_content(
    job_id: str,
    checkpoint_id: str,
    principal: Principal = Depends(get_principal),
    db: Session = Depends(get_db),
    services: AppServices = Depends(get_services),
    presign: PresignParams = Depends(presign_params),
) -> Response:
    if presign.presigned:
        require_presigning(services.storage)
        expires = expires_at(presign.expires_in)
        return JSONResponse(tree_body(service.presigned_checkpoint(db, services, principal, job_id, checkpoint_id,
                                                                   presign.expires_in), expires))
    name, chunks = service.checkpoint_tar(db, services, principal, job_id, checkpoint_id)
    return StreamingResponse(chunks, media_type="application/x-tar",
                             headers={"Content-Disposition": f"attachment; filename=\"{name}\""})


@router.get("/{job_id}/steps", response_model=StepList, summary="Per-step lineage, status and metrics (sDPO)")
def list_steps(job_id: str, principal: Principal = Depends(get_principal), db: Session = Depends(get_db)):
    return StepList.from_rows(service.list_steps(db, principal, job_id))


@router.get("/{job_id}/steps/{index}/samples", response_model=StepSamples,
            summary="A step's greedy answers to held-out prompts (method.<type>.samples), beside the base's")
def step_samples(job_id: str, index: int, principal: Principal = Depends(get_principal),
                 db: Session = Depends(get_db)):
    return StepSamples.from_row(service.step_samples(db, principal, job_id, index))
