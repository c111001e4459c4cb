"""Every query on jobs, steps, events and checkpoints made by the API (the worker's shared ones
live in core.jobs)."""

from __future__ import annotations

from sqlalchemy import func, select, text, tuple_
from sqlalchemy.orm import Session

from core.models import Checkpoint, Event, Job, RegisteredModel
from core.states import JOB_ACTIVE


def lock_owner_jobs(db: Session, owner: str) -> None:
    """Serialise job creation per owner until the transaction ends, so two concurrent creates
    cannot both pass the active-jobs limit. Postgres: a transaction-scoped advisory lock on the
    owner; SQLite already lets one writer in at a time."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"jobs:{owner}"})


def count_active(db: Session, owner: str) -> int:
    return db.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_([s.value for s in JOB_ACTIVE]))) or 0


def list_page(db: Session, owner: str, *, after: Job | None, limit: int,
              metadata: dict[str, str]) -> tuple[list[Job], bool]:
    """Newest first; (created_at, id) breaks ties so the cursor is exact."""
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
    """Newest first, like OpenAI; `after` continues towards older events."""
    query = select(Event).where(Event.job_id == job_id)
    if after is not None:
        query = query.where(Event.seq < after.seq)
    rows = list(db.scalars(query.order_by(Event.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_checkpoint(db: Session, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id)).first()


def checkpoints_page(db: Session, job_id: str, *, after: Checkpoint | None,
                     limit: int) -> tuple[list[Checkpoint], bool]:
    """Latest step first, like OpenAI's newest-first checkpoint list."""
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after is not None:
        query = query.where(Checkpoint.step_index < after.step_index)
    rows = list(db.scalars(query.order_by(Checkpoint.step_index.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def owned_checkpoint(db: Session, owner: str, checkpoint_id: str) -> Checkpoint | None:
    return db.scalars(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.owner == owner)).first()


def get_model(db: Session, model_id: str) -> RegisteredModel | None:
    return db.get(RegisteredModel, model_id)
