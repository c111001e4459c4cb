"""Every query on files."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select, text, tuple_
from sqlalchemy.orm import Session

from core.models import File, FileStatus, Job, JobStep
from core.states import JOB_ACTIVE


def get_visible(db: Session, owner: str, file_id: str, *, for_update: bool = False,
                for_share: bool = False) -> File | None:
    """The owner's file unless it was deleted (deleted files answer 404 like unknown ones).

    `for_update` (delete) and `for_share` (a job being created on it) make deleting a file and
    starting a job on it exclude each other on Postgres.
    """
    query = select(File).where(File.id == file_id, File.owner == owner, File.status != FileStatus.DELETED)
    if for_update or for_share:
        query = query.with_for_update(read=not for_update)
    return db.scalars(query).first()


def list_page(db: Session, owner: str, *, after: File | None, limit: int, descending: bool,
              purpose: str | None) -> tuple[list[File], bool]:
    query = select(File).where(File.owner == owner, File.status != FileStatus.DELETED)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    key = tuple_(File.created_at, File.id)
    if after is not None:
        cursor = tuple_(after.created_at, after.id)
        query = query.where(key < cursor if descending else key > cursor)
    order = (File.created_at.desc(), File.id.desc()) if descending else (File.created_at, File.id)
    rows = list(db.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def active_jobs_using(db: Session, file_id: str) -> list[str]:
    """Ids of unfinished jobs that read this file (as training, validation or a step's file)."""
    step_jobs = select(JobStep.job_id).where(JobStep.training_file_id == file_id)
    query = select(Job.id).where(
        Job.status.in_([s.value for s in JOB_ACTIVE]),
        or_(Job.training_file_id == file_id, Job.validation_file_id == file_id, Job.id.in_(step_jobs)),
    )
    return list(db.scalars(query))


def lock_owner_files(db: Session, owner: str) -> None:
    """Serialise file creation per owner until the transaction ends (api/files/quotas.py says
    why). Postgres: a transaction-scoped advisory lock; SQLite already lets one writer in at a time."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"files:{owner}"})


def owner_usage(db: Session, owner: str) -> tuple[int, int]:
    """(stored files, their bytes) of `owner`, deleted files left out."""
    count, total = db.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))
                              .where(File.owner == owner, File.status != FileStatus.DELETED)).one()
    return int(count), int(total)


def created_since(db: Session, owner: str, since: datetime) -> tuple[int, datetime | None]:
    """(files `owner` created after `since`, deleted ones included; the oldest one's created_at)."""
    count, oldest = db.execute(select(func.count(), func.min(File.created_at))
                               .where(File.owner == owner, File.created_at > since)).one()
    return int(count), oldest


def upload_totals(db: Session) -> tuple[int, int]:
    """(files ever uploaded, their bytes), every owner's, deleted files included."""
    count, total = db.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0)).select_from(File)).one()
    return int(count), int(total)
