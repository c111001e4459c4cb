"""Job and step queries and state changes shared by the API and the worker.

Each function adds and flushes; the caller commits. Functions that change a job's status lock its
row and its steps' rows first (SELECT … FOR UPDATE on Postgres; SQLite serialises writers with
BEGIN IMMEDIATE), so a user's cancel and a worker's "step succeeded" cannot interleave and
overwrite each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import ids
from core.errors import Conflict
from core.models import Event, Job, JobStep
from core.queue import enqueue_after_commit, job_chain
from core.states import STEP_TERMINAL, JobStatus, StepStatus, transition

EVENT_LEVELS = ("info", "warn", "error")
EVENT_TYPES = ("message", "metrics")


def get_job(session: Session, job_id: str, *, owner: str | None = None, for_update: bool = False) -> Job | None:
    """The job, or None; with `owner`, None also when it belongs to someone else."""
    query = select(Job).where(Job.id == job_id)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def get_steps(session: Session, job_id: str, *, for_update: bool = False) -> list[JobStep]:
    query = select(JobStep).where(JobStep.job_id == job_id).order_by(JobStep.index)
    if for_update:
        query = query.with_for_update()
    return list(session.scalars(query))


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    step_index: int | None = None,
    event_id: str | None = None,
) -> Event:
    """Append one event to a job's log (`type` "metrics" carries numbers in `data`).

    `event_id` lets a writer that may retry a transaction (the worker, while the database
    restarts) choose the id beforehand and skip events that an earlier try already committed."""
    if level not in EVENT_LEVELS or type not in EVENT_TYPES:
        raise ValueError(f"bad event level/type: {level!r}/{type!r}")
    event = Event(id=event_id or ids.new_id(ids.EVENT), job_id=job_id, message=message, level=level, type=type,
                  data=data, step_index=step_index)
    session.add(event)
    return event


def remaining_step_indexes(steps: Iterable[JobStep]) -> list[int]:
    """Indexes of the steps still to run, in order (everything not yet succeeded)."""
    return [s.index for s in sorted(steps, key=lambda s: s.index) if s.status != StepStatus.SUCCEEDED]


def fine_tuned_model_name(job: Job) -> str:
    """OpenAI's naming, `ft:{base}:{owner}:{suffix}:{job id}` (suffix may be empty)."""
    return f"ft:{job.model_id}:{job.owner}:{job.suffix or ''}:{job.id}"


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel now: the job and every unfinished step become `cancelled` in this transaction.

    A running step is marked cancelled too; the worker sees that on its next heartbeat and stops
    the training process. Cancelling is immediate (like OpenAI's) rather than a request, so a
    job is never left waiting on a worker that may be gone.
    """
    if job.status not in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING,
                          JobStatus.PAUSING, JobStatus.PAUSED):
        raise Conflict(f"Job {job.id} is {job.status} and cannot be cancelled.", param="fine_tuning_job_id",
                       code="job_not_cancellable")
    transition(job, JobStatus.CANCELLED)
    for step in get_steps(session, job.id, for_update=True):
        if step.status not in STEP_TERMINAL:
            transition(step, StepStatus.CANCELLED)
    add_event(session, job.id, "Job cancelled.")
    session.flush()
    return job


def pause_job(session: Session, job: Job) -> Job:
    """Pause: a queued job is paused at once; a running job moves to `pausing` and the worker
    saves the trainer state, stops, and sets `paused`."""
    if job.status == JobStatus.QUEUED:
        transition(job, JobStatus.PAUSED)
        for step in get_steps(session, job.id, for_update=True):
            if step.status == StepStatus.QUEUED:
                transition(step, StepStatus.PENDING)
        add_event(session, job.id, "Job paused.")
    elif job.status == JobStatus.RUNNING:
        transition(job, JobStatus.PAUSING)
        add_event(session, job.id, "Pause requested; the running step will save its state and stop.")
    else:
        raise Conflict(f"Job {job.id} is {job.status} and cannot be paused.", param="fine_tuning_job_id",
                       code="job_not_pausable")
    session.flush()
    return job


def resume_job(session: Session, job: Job, app: Celery) -> Job:
    """Resume a paused job: back to `queued`, and a chain of the remaining steps is sent after the
    commit (its prepare_job is a no-op for a job whose chunks already exist)."""
    if job.status != JobStatus.PAUSED:
        raise Conflict(f"Job {job.id} is {job.status}; only a paused job can be resumed.",
                       param="fine_tuning_job_id", code="job_not_resumable")
    transition(job, JobStatus.QUEUED)
    remaining = remaining_step_indexes(get_steps(session, job.id, for_update=True))
    add_event(session, job.id, f"Job resumed; {len(remaining)} step(s) to run.")
    session.flush()
    enqueue_after_commit(session, job_chain(app, job.id, remaining))
    return job
