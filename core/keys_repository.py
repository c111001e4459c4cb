"""Every query on API keys (core.keys holds the rules: hashing, rotation, revocation)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import ApiKey


def get_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    """The key whose sha256 hex digest is `key_hash` (revoked or not), by the unique index on it."""
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()


def get(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def revoked_at(session: Session, key_id: str) -> tuple[bool, datetime | None]:
    """(whether the key `key_id` exists, when it was revoked or None): one column, no row object."""
    row = session.execute(select(ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
    return (False, None) if row is None else (True, row[0])


def named(session: Session, name: str) -> list[ApiKey]:
    """Every key called `name`, revoked ones included."""
    return list(session.scalars(select(ApiKey).where(ApiKey.name == name)))


def list_all(session: Session) -> list[ApiKey]:
    """Every key, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
