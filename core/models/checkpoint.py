"""Checkpoints: the model a step produced, one per succeeded step."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_index"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_index: Mapped[int]
    uri: Mapped[str] = mapped_column(String(1024))  # a directory in storage (Storage.put_tree)
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the manifest, which hashes every file
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
