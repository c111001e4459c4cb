"""Every state change of a job and its steps, as a function of (session, …), for the API and the
worker alike: each does its `transition()`s (core.states holds the allowed edges) and its events,
with their wording, in one place.

Each function adds and flushes; the caller commits. Functions that change a job's status lock its
row and its steps' rows first (SELECT … FOR UPDATE on Postgres; SQLite serialises writers with
BEGIN IMMEDIATE), so a user's cancel and a worker's "step succeeded" cannot interleave and
overwrite each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from sqlalchemy.orm import Session

from core.errors import Conflict
from core.jobs.repository import add_event, get_steps
from core.models import Job, JobStep
from core.queue import enqueue_after_commit, job_chain
from core.states import STEP_TERMINAL, JobStatus, StepStatus, transition


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
