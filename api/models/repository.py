"""Every query on models."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.models import Checkpoint, RegisteredModel


def visible_to(owner: str):
    # System models (owner NULL) are shared; everything else is its owner's alone.
    return or_(RegisteredModel.owner.is_(None), RegisteredModel.owner == owner)


def get_visible(db: Session, owner: str, model_id: str) -> RegisteredModel | None:
    return db.scalars(select(RegisteredModel).where(RegisteredModel.id == model_id, visible_to(owner))).first()


def list_visible(db: Session, owner: str) -> list[RegisteredModel]:
    query = select(RegisteredModel).where(visible_to(owner)).order_by(RegisteredModel.created_at,
                                                                     RegisteredModel.id)
    return list(db.scalars(query))


def exists(db: Session, model_id: str) -> bool:
    return db.get(RegisteredModel, model_id) is not None


def owned_checkpoint_at(db: Session, owner: str, uri: str) -> Checkpoint | None:
    """The checkpoint of `owner` stored at `uri` (a storage URI), if any."""
    return db.scalars(select(Checkpoint).where(Checkpoint.uri == uri, Checkpoint.owner == owner)).first()
