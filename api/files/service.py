"""Files: receive an upload into storage, validate it, and keep a row only for a valid file."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.deps import AppServices, Principal
from api.files import repository
from api.files.multipart import MultipartUpload
from api.files.quotas import UploadAllowance, capped_upload, check_before_insert, too_many_rows
from api.files.tee import ValidatingTee
from api.pagination import check_limit
from core import ids
from core.clock import utcnow
from core.db import after_commit, after_rollback
from core.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from core.models import File, FileStatus
from core.settings import Settings
from core.storage import PresignedObject, Storage, StorageUnavailable, StoredObject
from core.text import clean_name
from sdpo_engine.data import parquet_rows, validate_file

log = logging.getLogger(__name__)

PURPOSE = "fine-tune"
MAX_FILENAME = 255
_READ_CHUNK = 1 << 20


@dataclass
class ReceivedUpload:
    """A stored, validated upload that has no row yet."""

    file_id: str
    stored: StoredObject
    filename: str
    purpose: str
    report: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What makes two uploads "the same request" for Idempotency-Key."""
        return {"purpose": self.purpose, "filename": self.filename, "sha256": self.stored.sha256,
                "bytes": self.stored.bytes}


def clean_filename(name: str | None) -> str:
    """The client's file name as display metadata: no directories, no control or format characters
    (core.text.clean_name)."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = clean_name(name)
    return name[:MAX_FILENAME] or "upload.jsonl"


def receive_upload(db: Session, services: AppServices, content_type: str | None,
                   raw_chunks: Iterable[bytes], *, allowance: UploadAllowance | None = None) -> ReceivedUpload:
    """Stream the upload to storage, validating it on the way (JSONL; Parquet once stored: api/files/tee.py).
    Anything wrong deletes the stored object
    and raises; a valid upload stays stored until the request commits or rolls back.

    The stream stops at row SDPO_MAX_FILE_ROWS + 1 (400 `too_many_rows`) and, given the owner's
    `allowance` (`quotas.admit_upload`), when its bytes pass the storage quota (413)."""
    settings, storage = services.settings, services.storage
    upload = MultipartUpload(content_type, allowed_fields=("purpose",))
    file_id = ids.new_id(ids.FILE)
    # The key is built from our id only: the client's file name never reaches the file system.
    file_chunks = capped_upload(upload.file_chunks(raw_chunks), max_rows=settings.max_file_rows,
                                allowance=allowance)
    # JSONL is validated while it streams to the store (one read of the bytes); Parquet after.
    tee = ValidatingTee(file_chunks, lambda stream: validate_file(
        stream, max_errors=settings.max_reported_errors, max_line_bytes=settings.max_line_bytes))
    try:
        stored = storage.save_stream(f"files/{file_id}", tee.chunks(), max_bytes=settings.max_upload_bytes)
    except StorageUnavailable as exc:
        tee.abort()
        # The store aborted its multipart upload (or never started one): nothing to clean up.
        raise _store_unavailable(storage, exc) from exc
    except BaseException:
        tee.abort()
        raise
    # If the request never commits (an error later, a lost idempotency race, a failed commit),
    # the object goes too.
    after_rollback(db, lambda: _delete_quietly(storage, stored.uri))
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                                 code="missing_required_parameter")
        if purpose != PURPOSE:
            raise InvalidRequest(f"Invalid purpose {purpose!r}: this service only accepts '{PURPOSE}'.",
                                 param="purpose", code="invalid_purpose")
        report = tee.report()
        if report is None:
            # Parquet: read back as a stream from the store (an S3 object by ranged GETs), never
            # whole in memory or on the API's disk.
            with storage.open(stored.uri) as stream:
                # A Parquet file has no lines for the stream to count; its footer says how many rows it has.
                declared_rows = parquet_rows(stream)
                if declared_rows is not None and declared_rows > settings.max_file_rows:
                    raise too_many_rows(settings.max_file_rows, rows=declared_rows)
                report = validate_file(stream, max_errors=settings.max_reported_errors,
                                       max_line_bytes=settings.max_line_bytes)
        if report["rows"] > settings.max_file_rows:  # the stream's count stops this first; kept as a backstop
            raise too_many_rows(settings.max_file_rows, rows=report["rows"])
        if not report["valid"]:
            count = report["error_count"]
            raise InvalidRequest(
                f"The file has {count} problem{'s' if count != 1 else ''}; nothing was stored. "
                "Each problem is listed in `errors` with its line (Parquet: row), field and reason.",
                param="file", code="invalid_file",
                extra={"errors": report["errors"], "error_count": count, "format": report["format"],
                       "file_type": report["file_type"], "rows": report["rows"]},
            )
    except StorageUnavailable as exc:
        _delete_quietly(storage, stored.uri)
        raise _store_unavailable(storage, exc) from exc
    except BaseException:
        # Deleted here as well as by the rollback hook, so the object is gone before the error
        # response leaves (the session is only closed after).
        _delete_quietly(storage, stored.uri)
        raise
    return ReceivedUpload(file_id=file_id, stored=stored, filename=clean_filename(upload.filename),
                          purpose=purpose, report=report)


def _store_unavailable(storage: Storage, exc: StorageUnavailable) -> ServiceUnavailable:
    return ServiceUnavailable(f"The file store ({storage.describe()}) is unavailable; nothing was stored. "
                              "Retry later.", param="file", code="storage_unavailable")


def _delete_quietly(storage: Storage, uri: str) -> None:
    """Remove an object that must not stay; a store that is away leaves it unregistered (no row
    names it), which is logged rather than raised over the request's own error."""
    try:
        storage.delete(uri)
    except OSError:
        log.warning("could not delete the unregistered object %s", uri, exc_info=True)


def create_file(db: Session, principal: Principal, upload: ReceivedUpload, *,
                settings: Settings | None = None) -> File:
    """Insert the file's row and return it. With `settings`, the owner's quotas are checked again first, under
    the owner's lock, this file included (429/413; the caller's rollback deletes the object)."""
    if settings is not None:
        check_before_insert(db, settings, principal.owner, upload.stored.bytes)
    row = File(
        id=upload.file_id,
        owner=principal.owner,
        filename=upload.filename,
        bytes=upload.stored.bytes,
        sha256=upload.stored.sha256,
        purpose=upload.purpose,
        format=upload.report["format"],
        rows=upload.report["rows"],
        status=FileStatus.PROCESSED,
        report=upload.report,
        storage_uri=upload.stored.uri,
    )
    db.add(row)
    db.flush()
    return row


def get_file(db: Session, principal: Principal, file_id: str) -> File:
    row = repository.get_visible(db, principal.owner, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


def list_files(db: Session, principal: Principal, *, after: str | None, limit: int | None, order: str,
               purpose: str | None) -> tuple[list[File], bool]:
    """(the page of the owner's files, whether more follow)."""
    limit = check_limit(limit, default=10_000, maximum=10_000)
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order", code="invalid_value")
    cursor = None
    if after is not None:
        cursor = repository.get_visible(db, principal.owner, after)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no file {after!r}.", param="after", code="invalid_cursor")
    return repository.list_page(db, principal.owner, after=cursor, limit=limit, descending=order == "desc",
                                purpose=purpose)


def file_content(services: AppServices, row: File) -> Iterator[bytes]:
    """The stored bytes, a megabyte at a time (never the whole file in memory). The object is
    opened before the response starts, so a missing object fails as an error, not a cut body."""
    handle = services.storage.open(row.storage_uri)

    def chunks() -> Iterator[bytes]:
        with handle:
            while block := handle.read(_READ_CHUNK):
                yield block

    return chunks()


def presigned_file(services: AppServices, row: File, expires_in: int) -> PresignedObject:
    """A presigned GET URL for the stored bytes (the S3 store only: callers check `presigns`),
    with the sha256 and size recorded at upload."""
    try:
        url = services.storage.presign(row.storage_uri, expires_in)
    except FileNotFoundError as exc:
        raise NotFound(f"The content of {row.id} is missing from the store.", param="file_id",
                       code="file_content_missing") from exc
    return PresignedObject(path="", url=url, sha256=row.sha256, bytes=row.bytes)


def delete_file(db: Session, services: AppServices, principal: Principal, file_id: str) -> File:
    """Soft-delete: the row stays (finished jobs still name it) but answers 404 from now on; the
    stored bytes are removed once the deletion has committed."""
    row = repository.get_visible(db, principal.owner, file_id, for_update=True)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    users = repository.active_jobs_using(db, row.id)
    if users:
        raise Conflict(f"File {file_id} is used by unfinished job(s) {', '.join(sorted(users))}; "
                       "cancel them or wait for them to finish.", param="file_id", code="file_in_use")
    row.status = FileStatus.DELETED
    row.deleted_at = utcnow()
    db.flush()
    uri = row.storage_uri
    after_commit(db, lambda: services.storage.delete(uri))
    return row
