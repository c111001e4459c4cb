"""Stored responses of POSTs sent with an `Idempotency-Key` header."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    # Keys are per owner: two users picking the same key never collide.
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of method, path and body: the same key with another request is a 409.
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int]
    response_body: Mapped[dict]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
