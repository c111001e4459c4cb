"""Every query on models."""

from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.models import Checkpoint, Job, RegisteredModel
from core.states import JOB_ACTIVE


def visible_to(owner: str):
    # System models (owner NULL) are shared; everything else is its owner's alone. A deleted
    # fine-tuned model answers like an unknown one.
    return and_(or_(RegisteredModel.owner.is_(None), RegisteredModel.owner == owner),
                RegisteredModel.deleted_at.is_(None))


def get_visible(db: Session, owner: str, model_id: str, *, for_update: bool = False,
                for_share: bool = False) -> RegisteredModel | None:
    """The model if `owner` may use it. `for_update` (delete) and `for_share` (a job being created
    on it) make deleting a model and starting a job on it exclude each other on Postgres."""
    query = select(RegisteredModel).where(RegisteredModel.id == model_id, visible_to(owner))
    if for_update or for_share:
        query = query.with_for_update(read=not for_update)
    return db.scalars(query).first()


def active_jobs_on(db: Session, model_id: str) -> list[str]:
    """Ids of unfinished jobs (validating, queued, running, pausing, paused) that start from the model."""
    query = select(Job.id).where(Job.model_id == model_id, Job.status.in_([s.value for s in JOB_ACTIVE]))
    return list(db.scalars(query.order_by(Job.id)))


def list_visible(db: Session, owner: str) -> list[RegisteredModel]:
    query = select(RegisteredModel).where(visible_to(owner)).order_by(RegisteredModel.created_at,
                                                                     RegisteredModel.id)
    return list(db.scalars(query))


def exists(db: Session, model_id: str) -> bool:
    return db.get(RegisteredModel, model_id) is not None


def owned_checkpoint_at(db: Session, owner: str, uri: str) -> Checkpoint | None:
    """The checkpoint of `owner` stored at `uri` (a storage URI), if any."""
    return db.scalars(select(Checkpoint).where(Checkpoint.uri == uri, Checkpoint.owner == owner)).first()
