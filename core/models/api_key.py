"""API keys: only a hash is stored, so a leaked database does not leak keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # Every file, job, model and checkpoint belongs to an owner; several keys may share one.
    owner: Mapped[str] = mapped_column(String(64), index=True)
    # sha256 hex of the whole key. Keys are 32 random bytes, so a plain (unsalted) hash is enough:
    # there is no dictionary to attack, and the hash must be searchable.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
