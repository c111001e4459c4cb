"""Response shapes of /v1/files (OpenAI's file object plus sDPO extensions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from core.clock import to_unix
from core.models import File


class FileWarning(BaseModel):
    """A data smell found by validation: the file is valid and trains, but may not say what its
    author meant (see `sdpo_engine.data.validate_file` for the codes)."""

    code: str
    message: str
    count: int
    lines: list[int]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    # Extensions
    sha256: str
    file_type: str = "jsonl"
    format: str | None
    rows: int
    stats: dict[str, Any] | None
    warnings: list[FileWarning] | None = None

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        report = row.report or {}
        return cls(id=row.id, bytes=row.bytes, created_at=to_unix(row.created_at), filename=row.filename,
                   purpose=row.purpose, status=row.status, status_details=row.status_details, expires_at=None,
                   sha256=row.sha256,
                   # Files validated before Parquet support were all JSONL, and their reports had no
                   # warnings (None: not computed, unlike [] for none found).
                   file_type=report.get("file_type") or "jsonl", format=row.format, rows=row.rows,
                   stats=report.get("stats"), warnings=report.get("warnings"))


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def page(cls, rows: list[File], *, has_more: bool) -> FileList:
        return cls(data=[FileObject.from_row(r) for r in rows], has_more=has_more,
                   first_id=rows[0].id if rows else None, last_id=rows[-1].id if rows else None)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
