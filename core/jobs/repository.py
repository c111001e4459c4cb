"""Every query on jobs, steps, events and checkpoints, for the API and the worker alike.

Functions add and flush at most; the caller (the request, or the worker's transaction) commits.
`for_update=True` locks the rows it returns (SELECT … FOR UPDATE on Postgres; SQLite serialises
writers with BEGIN IMMEDIATE) so that a user's cancel and a worker's "step succeeded" cannot
interleave and overwrite each other.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, func, literal_column, select, text, tuple_, update
from sqlalchemy.orm import Session

from core import ids
from core.clock import utcnow
from core.models import Checkpoint, Event, File, Job, JobStep, RegisteredModel
from core.models.event import CACHE_FIELD
from core.states import JOB_ACTIVE, JOB_TERMINAL, JobStatus, StepStatus, sources

EVENT_LEVELS = ("info", "warn", "error")
_ENDED = sorted(s.value for s in JOB_TERMINAL)  # the job statuses of an ended job, for IN (...)
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
    """The job's steps in order (index 1..n_steps); empty for an unknown job."""
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
    restarts) choose the id beforehand and skip events that an earlier try already committed.
    Raises ValueError for a level or type outside EVENT_LEVELS / EVENT_TYPES."""
    if level not in EVENT_LEVELS or type not in EVENT_TYPES:
        raise ValueError(f"bad event level/type: {level!r}/{type!r}")
    event = Event(id=event_id or ids.new_id(ids.EVENT), job_id=job_id, message=message, level=level, type=type,
                  data=data, step_index=step_index)
    session.add(event)
    return event


def lock_owner_jobs(db: Session, owner: str) -> None:
    """Serialise job creation per owner until the transaction ends, so two concurrent creates
    cannot both pass the active-jobs limit. Postgres: a transaction-scoped advisory lock on the
    owner; SQLite already lets one writer in at a time."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"jobs:{owner}"})


def count_active(db: Session, owner: str) -> int:
    """The owner's unfinished jobs (validating, queued, running, pausing, paused)."""
    return db.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_([s.value for s in JOB_ACTIVE]))) or 0


def list_page(db: Session, owner: str, *, after: Job | None, limit: int,
              metadata: dict[str, str]) -> tuple[list[Job], bool]:
    """(up to `limit` jobs, whether more follow), newest first; (created_at, id) breaks ties so the
    cursor is exact."""
    query = select(Job).where(Job.owner == owner)
    for key, value in metadata.items():
        query = query.where(Job.metadata_[key].as_string() == value)
    if after is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after.created_at, after.id))
    rows = list(db.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_event(db: Session, job_id: str, event_id: str) -> Event | None:
    return db.scalars(select(Event).where(Event.job_id == job_id, Event.id == event_id)).first()


def events_page(db: Session, job_id: str, *, after: Event | None, limit: int) -> tuple[list[Event], bool]:
    """(up to `limit` events, whether more follow), newest first like OpenAI; `after` continues
    towards older events."""
    query = select(Event).where(Event.job_id == job_id)
    if after is not None:
        query = query.where(Event.seq < after.seq)
    rows = list(db.scalars(query.order_by(Event.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_checkpoint(db: Session, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id)).first()


def checkpoints_page(db: Session, job_id: str, *, after: Checkpoint | None,
                     limit: int) -> tuple[list[Checkpoint], bool]:
    """(up to `limit` checkpoints, whether more follow), latest step first like OpenAI's
    newest-first checkpoint list."""
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after is not None:
        query = query.where(Checkpoint.step_index < after.step_index)
    rows = list(db.scalars(query.order_by(Checkpoint.step_index.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def owned_checkpoint(db: Session, owner: str, checkpoint_id: str) -> Checkpoint | None:
    return db.scalars(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.owner == owner)).first()


def get_model(db: Session, model_id: str) -> RegisteredModel | None:
    return db.get(RegisteredModel, model_id)


# ------------------------------------------------------------------------------------------------
# The worker's queries: claims, heartbeats, the reaper's sweeps, and event bookkeeping.


def claim_step_row(session: Session, step: JobStep, *, worker: str, reference_id: str | None,
                   now: datetime) -> bool:
    """The claim: one conditional UPDATE moving `step` to running (attempt + 1, this worker) if it
    is still in a status that may go to running. A duplicate or redelivered task finds the step no
    longer queued, updates nothing and gets False. The row is refreshed on success."""
    claimed = session.execute(
        update(JobStep)
        .where(JobStep.id == step.id, JobStep.status.in_([st.value for st in sources(StepStatus.RUNNING)]))
        .values(status=StepStatus.RUNNING.value, attempt=JobStep.attempt + 1, worker=worker, heartbeat_at=now,
                started_at=step.started_at or now, updated_at=now, reference_checkpoint_id=reference_id,
                policy_init_checkpoint_id=reference_id)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
    if claimed == 1:
        session.refresh(step)
    return claimed == 1


def touch_heartbeat(session: Session, step_id: str, attempt: int) -> None:
    """Stamp the step's heartbeat, only while it is still running this `attempt` (an attempt the
    reaper wrote off must not look alive)."""
    session.execute(update(JobStep).where(JobStep.id == step_id, JobStep.status == StepStatus.RUNNING.value,
                                          JobStep.attempt == attempt).values(heartbeat_at=utcnow()))


def step_control_state(session: Session, job_id: str, step_id: str) -> tuple[str | None, str, int]:
    """(job status, step status, step attempt), read without locks: what a training step polls."""
    job_status = session.scalar(select(Job.status).where(Job.id == job_id))
    row = session.execute(select(JobStep.status, JobStep.attempt).where(JobStep.id == step_id)).one()
    return job_status, row.status, row.attempt


def metrics_global_steps(session: Session, job_id: str, index: int) -> set[int]:
    """The optimizer steps (`data.global_step`) of step `index` that have a metrics event."""
    return {g for g in session.scalars(select(Event.data["global_step"].as_integer()).where(
        Event.job_id == job_id, Event.step_index == index, Event.type == "metrics")) if g is not None}


def latest_metrics_global_step(session: Session, job_id: str, index: int) -> int:
    """The highest optimizer step of step `index` with a metrics event (0 if none): how far earlier
    attempts recorded their metrics."""
    return int(session.scalar(select(func.max(Event.data["global_step"].as_integer())).where(
        Event.job_id == job_id, Event.step_index == index, Event.type == "metrics")) or 0)


def existing_event_ids(session: Session, event_ids: list[str]) -> set[str]:
    """Which of `event_ids` are already in the events table (asked 500 at a time)."""
    found: set[str] = set()
    for start in range(0, len(event_ids), 500):
        found |= set(session.scalars(select(Event.id).where(Event.id.in_(event_ids[start:start + 500]))))
    return found


def jobs_with_stale_steps(session: Session, cutoff: datetime) -> list[str]:
    """Ids of jobs with a running step whose heartbeat is older than `cutoff`, sorted."""
    return sorted(set(session.scalars(select(JobStep.job_id).where(
        JobStep.status == StepStatus.RUNNING.value, JobStep.heartbeat_at < cutoff))))


def jobs_waiting_on_message(session: Session, cutoff: datetime) -> list[str]:
    """Ids of queued or running jobs, oldest first, with no running step and no change since
    `cutoff`: they wait on a broker message (which may be lost)."""
    busy = select(JobStep.job_id).where(JobStep.status == StepStatus.RUNNING.value)
    return list(session.scalars(select(Job.id).where(
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]), Job.updated_at < cutoff,
        Job.id.not_in(busy)).order_by(Job.created_at)))


def jobs_with_end_transition_due(session: Session, cutoff: datetime) -> list[str]:
    """Ids of ended jobs (succeeded, failed, cancelled), oldest first, whose end transition was not
    done (`end_transition_at` NULL) and that have not changed since `cutoff`: the worker that ended
    them, or the cancel's sdpo.job_ended message, had that long to do it."""
    return list(session.scalars(select(Job.id).where(
        Job.end_transition_at.is_(None), Job.status.in_(_ENDED),
        Job.updated_at < cutoff).order_by(Job.updated_at)))


def mark_end_transition_done(session: Session, job_id: str) -> None:
    """Record that the end transition of ended job `job_id` was done (its first time counts)."""
    session.execute(update(Job).where(Job.id == job_id, Job.end_transition_at.is_(None),
                                      Job.status.in_(_ENDED))
                    .values(end_transition_at=utcnow()))


def starting_model(session: Session, job: Job) -> tuple[str, str, str]:
    """(source, id, uri) of the model a job starts from: its initial checkpoint ("checkpoint"), or its
    registered model (source "local", "hub", "gguf", …; the uri is `file://`, `local://` or a hub id)."""
    if job.initial_checkpoint_id:
        checkpoint = session.get_one(Checkpoint, job.initial_checkpoint_id)
        return "checkpoint", checkpoint.id, checkpoint.uri
    model = session.get_one(RegisteredModel, job.model_id)
    return model.source, model.id, model.uri


def file_uri(session: Session, file_id: str) -> str:
    """The storage URI of an uploaded file (NoResultFound if there is none)."""
    return session.get_one(File, file_id).storage_uri


def step_training_uri(session: Session, step: JobStep) -> str:
    """The storage URI a step trains on: its chunk (a partitioned job) or its own file. Raises
    ValueError for a step with neither (a partitioned job whose chunks are not written yet)."""
    if step.chunk_uri:
        return step.chunk_uri
    if step.training_file_id is None:
        raise ValueError(f"step {step.index} of {step.job_id} has neither a chunk nor a training file")
    return file_uri(session, step.training_file_id)


# ------------------------------------------------------------------------------------------------
# The API's read side: progress, the live event stream, the /metrics scrape, a job's model.


def get_checkpoint_by_id(session: Session, checkpoint_id: str) -> Checkpoint | None:
    """The checkpoint `checkpoint_id` (any job's, any owner's: the caller checks ownership)."""
    return session.get(Checkpoint, checkpoint_id)


def steps_of_jobs(session: Session, job_ids: list[str]) -> dict[str, list[JobStep]]:
    """The steps of each job in `job_ids`, in index order, by job id (an empty list for a job
    without steps): one query for a whole page of jobs."""
    steps: dict[str, list[JobStep]] = {job_id: [] for job_id in job_ids}
    query = select(JobStep).where(JobStep.job_id.in_(job_ids)).order_by(JobStep.job_id, JobStep.index)
    for step in session.scalars(query):
        steps[step.job_id].append(step)
    return steps


def latest_metrics_events(session: Session, job_ids: list[str]) -> dict[str, Event]:
    """The newest `metrics` event of each job in `job_ids` that has one, by job id."""
    if not job_ids:
        return {}
    newest = (select(func.max(Event.seq)).where(Event.job_id.in_(job_ids), Event.type == "metrics")
              .group_by(Event.job_id))
    return {e.job_id: e for e in session.scalars(select(Event).where(Event.seq.in_(newest)))}


def first_metrics_event(session: Session, job_id: str, step_index: int) -> Event | None:
    """The oldest `metrics` event of step `step_index` of the job, or None."""
    query = select(Event).where(Event.job_id == job_id, Event.type == "metrics", Event.step_index == step_index)
    return session.scalars(query.order_by(Event.seq).limit(1)).first()


def succeeded_steps(session: Session, job_id: str) -> list[JobStep]:
    """The job's succeeded steps, by index."""
    return list(session.scalars(select(JobStep).where(JobStep.job_id == job_id, JobStep.status == StepStatus.SUCCEEDED)
                                .order_by(JobStep.index)))


def checkpoint_sha256s(session: Session, checkpoint_ids: Collection[str]) -> dict[str, str | None]:
    """{checkpoint id: sha256 of its stored tree (None if not recorded)} of those of `checkpoint_ids`
    that exist."""
    if not checkpoint_ids:
        return {}
    query = select(Checkpoint.id, Checkpoint.sha256).where(Checkpoint.id.in_(checkpoint_ids))
    return {checkpoint_id: sha256 for checkpoint_id, sha256 in session.execute(query)}


def metrics_events(session: Session, job_id: str) -> list[Event]:
    """Every `metrics` event of the job, oldest first."""
    return list(session.scalars(select(Event).where(Event.job_id == job_id, Event.type == "metrics")
                                .order_by(Event.seq)))


def count_checkpoint_cache_events(session: Session) -> dict[str, int]:
    """{"hit": n, "miss": n}, every owner's: the steps whose initial checkpoint was already in their
    worker's cache, or was downloaded from the store. Counted from the structured field the worker
    writes on that step event (`data.checkpoint_cache`, worker/flows.py), not from its text; the
    partial index ix_events_checkpoint_cache holds just those events, so a scrape stays cheap."""
    field: ColumnElement[str] = literal_column(CACHE_FIELD, String)
    counts: dict[str, int] = dict(session.execute(select(field, func.count()).select_from(Event).where(
        field.in_(("hit", "miss")), Event.step_index.is_not(None)).group_by(field)).tuples().all())
    return {word: counts.get(word, 0) for word in ("hit", "miss")}


def _waiting_steps():
    # Queued steps of running jobs: work a worker could claim now.
    return select(func.count()).select_from(JobStep).join(Job, Job.id == JobStep.job_id).where(
        JobStep.status == StepStatus.QUEUED.value, Job.status == JobStatus.RUNNING.value)


def queued_jobs_before(session: Session, job: Job) -> int:
    """Queued jobs (every owner's) created before `job`; (created_at, id) breaks ties."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED.value,
        tuple_(Job.created_at, Job.id) < tuple_(job.created_at, job.id))) or 0


def waiting_steps_before(session: Session, step: JobStep) -> int:
    """Queued steps of running jobs (every owner's) queued before `step` (by updated_at, then id)."""
    return session.scalar(_waiting_steps().where(
        tuple_(JobStep.updated_at, JobStep.id) < tuple_(step.updated_at, step.id))) or 0


def count_waiting_steps(session: Session) -> int:
    """Queued steps of running jobs, every owner's."""
    return session.scalar(_waiting_steps()) or 0


def count_jobs_by_status(session: Session) -> dict[str, int]:
    """{status: jobs}, every owner's; statuses without a job are left out."""
    return {status: count for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def count_steps_by_status(session: Session) -> dict[str, int]:
    """{status: steps}, every owner's; statuses without a step are left out."""
    query = select(JobStep.status, func.count()).group_by(JobStep.status)
    return {status: count for status, count in session.execute(query)}


def succeeded_step_durations(session: Session) -> list[float]:
    """Wall time in seconds (finished_at - started_at) of every succeeded step that has both."""
    rows = session.execute(select(JobStep.started_at, JobStep.finished_at).where(
        JobStep.status == StepStatus.SUCCEEDED.value, JobStep.started_at.is_not(None),
        JobStep.finished_at.is_not(None)))
    # the query leaves out the rows where either is NULL; the check says so to the type checker
    return [(finished - started).total_seconds() for started, finished in rows
            if started is not None and finished is not None]


def running_steps(session: Session) -> list[tuple[str, int]]:
    """(job id, step index) of every running step."""
    query = select(JobStep.job_id, JobStep.index).where(JobStep.status == StepStatus.RUNNING.value)
    return [(job_id, index) for job_id, index in session.execute(query)]


def owned_job_status(session: Session, job_id: str, owner: str) -> str | None:
    """The status of `owner`'s job `job_id`; None for an unknown job or another owner's."""
    return session.scalar(select(Job.status).where(Job.id == job_id, Job.owner == owner))


def events_after(session: Session, job_id: str, after_seq: int, *, limit: int) -> list[Event]:
    """Up to `limit` of the job's events numbered after `after_seq`, oldest first."""
    return list(session.scalars(select(Event).where(Event.job_id == job_id, Event.seq > after_seq)
                                .order_by(Event.seq).limit(limit)))
