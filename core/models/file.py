"""Uploaded preference files."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class FileStatus(StrEnum):
    # The API validates uploads synchronously and stores nothing for an invalid one, so rows are
    # normally `processed`. `error` exists for files validated later (or imported) that failed;
    # jobs refuse any file that is not `processed`. `deleted` rows stay because finished jobs
    # still name them; their content is gone and the API answers 404 for them.
    PROCESSED = "processed"
    ERROR = "error"
    DELETED = "deleted"


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))  # the user's name, metadata only
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    format: Mapped[str | None] = mapped_column(String(32))  # standard | conversational | openai
    rows: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16), default=FileStatus.PROCESSED)
    status_details: Mapped[str | None] = mapped_column(String(1024))
    # sdpo_engine.data.validate_file's report: valid, format, rows, errors, error_count, stats.
    report: Mapped[dict]
    storage_uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]
