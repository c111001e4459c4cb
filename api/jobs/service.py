"""Jobs: create (checked spec -> job + T steps + one chained message after the commit), read,
and the cancel / pause / resume state changes (delegated to core.jobs, which the worker shares)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from api.deps import AppServices, Principal
from api.jobs import spec
from api.jobs.integrations import check_integrations
from api.jobs.progress import job_progress
from api.jobs.schemas import JobCreate, JobObject
from api.pagination import check_limit
from core import ids
from core.errors import InvalidRequest, NotFound, TooManyRequests
from core.jobs import cancel_job, get_job, get_steps, pause_job, repository, resume_job
from core.jobs.lifecycle import create_job as create_job_row
from core.models import Checkpoint, Event, Job, JobStep
from core.states import JobStatus, StepStatus
from core.storage import PresignedObject

_METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")


def create_job(db: Session, services: AppServices, principal: Principal, body: JobCreate) -> Job:
    """Check the spec, add the job and its steps (queued; the chain is sent after the commit); return
    the job. 400 for a bad spec, 429 past SDPO_MAX_ACTIVE_JOBS_PER_OWNER."""
    integrations = check_integrations(body.integrations, services.settings)
    plan = spec.build_plan(db, principal.owner, body, services.settings)
    _check_active_limit(db, principal.owner, services.settings.max_active_jobs_per_owner)
    initial = plan.initial_checkpoint
    job = Job(
        id=ids.new_id(ids.JOB),
        owner=principal.owner,
        model=body.model,
        model_id=plan.model.id,
        initial_checkpoint_id=initial.id if initial else None,
        training_file_id=plan.training_file.id,
        validation_file_id=plan.validation_file.id if plan.validation_file else None,
        method=plan.method,
        hyperparameters=plan.hyperparameters,
        partition=plan.partition,
        n_steps=len(plan.steps),
        status=JobStatus.VALIDATING_FILES,
        seed=plan.seed,
        suffix=plan.suffix,
        metadata_=plan.metadata,
        integrations=integrations,
    )
    # sDPO: step 1's policy and reference are the starting model (a checkpoint when branching;
    # otherwise the registered model, recorded as None); later steps are filled by the worker
    # with the previous step's output when it claims them.
    start = initial.id if initial else None
    steps = [JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=step.index, status=StepStatus.PENDING,
                     training_file_id=step.training_file.id if step.training_file else None,
                     hyperparameters=step.config.to_dict(),
                     reference_checkpoint_id=start if step.index == 1 else None,
                     policy_init_checkpoint_id=start if step.index == 1 else None) for step in plan.steps]
    origin = f"checkpoint {initial.id}" if initial else f"model {plan.model.id}"
    create_job_row(db, services.celery, job, steps, origin=origin, method_type=plan.method_type)
    return job


def _check_active_limit(db: Session, owner: str, limit: int) -> None:
    """One owner cannot fill every worker's queue: at most `limit` unfinished jobs (0: no limit).
    Checked after the spec so a bad spec still gets its own 400."""
    if not limit:
        return
    repository.lock_owner_jobs(db, owner)
    active = repository.count_active(db, owner)
    if active >= limit:
        raise TooManyRequests(
            f"This owner already has {active} unfinished jobs, the most allowed (SDPO_MAX_ACTIVE_JOBS_PER_OWNER="
            f"{limit}). Wait for one to finish, or cancel one, then try again.",
            param=None, code="too_many_active_jobs", extra={"active_jobs": active, "limit": limit})


def find_job(db: Session, principal: Principal, job_id: str, *, for_update: bool = False) -> Job:
    job = get_job(db, job_id, owner=principal.owner, for_update=for_update)
    if job is None:
        raise NotFound(f"No fine-tuning job found with id {job_id}.", param="fine_tuning_job_id",
                       code="job_not_found")
    return job


def job_with_progress(db: Session, job: Job) -> JobObject:
    """The job object with its `progress` (step k of T, percent, tokens/s, ETA, queue position)."""
    db.flush()
    return JobObject.from_row(job, job_progress(db, [job])[job.id])


def metadata_filter(query_items: list[tuple[str, str]]) -> dict[str, str]:
    """`metadata[key]=value` query parameters, as OpenAI's list endpoints take them."""
    out = {}
    for name, value in query_items:
        match = _METADATA_QUERY.match(name)
        if match:
            out[match.group(1)] = value
    return out


def list_jobs(db: Session, principal: Principal, *, after: str | None, limit: int | None,
              metadata: dict[str, str]) -> tuple[list[Job], dict[str, dict[str, Any]], bool]:
    """(a page of the owner's jobs, newest first; their progress by job id; whether more follow)."""
    limit = check_limit(limit, default=20, maximum=100)
    cursor = None
    if after is not None:
        cursor = get_job(db, after, owner=principal.owner)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no job {after!r}.", param="after", code="invalid_cursor")
    rows, has_more = repository.list_page(db, principal.owner, after=cursor, limit=limit, metadata=metadata)
    return rows, job_progress(db, rows), has_more


def change_state(db: Session, services: AppServices, principal: Principal, job_id: str,
                 action: str) -> Job:
    """Cancel, pause or resume the owner's job (409 where its status does not allow it); return it."""
    job = find_job(db, principal, job_id, for_update=True)
    if action == "cancel":
        cancel_job(db, job, services.celery)
    elif action == "pause":
        pause_job(db, job)
    elif action == "resume":
        resume_job(db, job, services.celery)
    else:  # pragma: no cover - routes pass fixed names
        raise ValueError(action)
    return job


def list_events(db: Session, principal: Principal, job_id: str, *, after: str | None,
                limit: int | None) -> tuple[list[Event], bool]:
    """(a page of the job's events, newest first, whether more follow)."""
    job = find_job(db, principal, job_id)
    limit = check_limit(limit, default=20, maximum=100)
    cursor = None
    if after is not None:
        cursor = repository.get_event(db, job.id, after)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no event {after!r} in this job.", param="after",
                                 code="invalid_cursor")
    return repository.events_page(db, job.id, after=cursor, limit=limit)


def stream_start(db: Session, principal: Principal, job_id: str, last_event_id: str | None) -> int:
    """The `seq` after which a live stream of the job's events starts (0: the first event)."""
    job = find_job(db, principal, job_id)
    if not last_event_id:
        return 0
    cursor = repository.get_event(db, job.id, last_event_id.strip())
    if cursor is None:
        raise InvalidRequest(f"Invalid Last-Event-ID: no event {last_event_id!r} in this job.",
                             param="Last-Event-ID", code="invalid_cursor")
    return cursor.seq


def list_checkpoints(db: Session, principal: Principal, job_id: str, *, after: str | None,
                     limit: int | None) -> tuple[Job, list[Checkpoint], bool]:
    """(the job, a page of its checkpoints, latest step first, whether more follow)."""
    job = find_job(db, principal, job_id)
    limit = check_limit(limit, default=10, maximum=100)
    cursor = None
    if after is not None:
        cursor = repository.get_checkpoint(db, job.id, after)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no checkpoint {after!r} in this job.", param="after",
                                 code="invalid_cursor")
    rows, has_more = repository.checkpoints_page(db, job.id, after=cursor, limit=limit)
    return job, rows, has_more


def checkpoint_tar(db: Session, services: AppServices, principal: Principal, job_id: str,
                   checkpoint_id: str) -> tuple[str, Iterator[bytes]]:
    job = find_job(db, principal, job_id)
    checkpoint = repository.get_checkpoint(db, job.id, checkpoint_id)
    if checkpoint is None or not services.storage.exists(checkpoint.uri):
        raise NotFound(f"No checkpoint {checkpoint_id} in job {job_id}.", param="checkpoint_id",
                       code="checkpoint_not_found")
    return f"{checkpoint.id}.tar", services.storage.iter_tar(checkpoint.uri)


def presigned_checkpoint(db: Session, services: AppServices, principal: Principal, job_id: str,
                         checkpoint_id: str, expires_in: int) -> list[PresignedObject]:
    """One presigned GET URL per file of the owner's checkpoint, with its sha256 and size from the
    stored tree's index (the S3 store only: callers check `presigns`). 404 as `checkpoint_tar`."""
    job = find_job(db, principal, job_id)
    checkpoint = repository.get_checkpoint(db, job.id, checkpoint_id)
    try:
        if checkpoint is not None:
            return services.storage.presign_tree(checkpoint.uri, expires_in)
    except FileNotFoundError:
        pass
    raise NotFound(f"No checkpoint {checkpoint_id} in job {job_id}.", param="checkpoint_id",
                   code="checkpoint_not_found")


def list_steps(db: Session, principal: Principal, job_id: str) -> list[JobStep]:
    """The owner's job's steps, in order."""
    job = find_job(db, principal, job_id)
    return get_steps(db, job.id)


def step_samples(db: Session, principal: Principal, job_id: str, index: int) -> JobStep:
    """The owner's job's step `index` with its samples; 404 (param ``index``) when the job has no such
    step or the step has none yet (not finished, or the job asked for no samples)."""
    job = find_job(db, principal, job_id)
    step = next((s for s in get_steps(db, job.id) if s.index == index), None)
    if step is None:
        raise NotFound(f"Job {job_id} has no step {index}.", param="index", code="step_not_found")
    if not isinstance((step.metrics or {}).get("samples"), dict):
        raise NotFound(f"Step {index} of job {job_id} has no samples" + (
            ": the job asked for none (method.<type>.samples)." if not _asks_samples(job)
            else f" yet (the step is {step.status})."), param="index", code="samples_not_found")
    return step


def _asks_samples(job: Job) -> bool:
    method = job.method or {}
    return bool((method.get(method.get("type") or "") or {}).get("samples"))
