"""Per-owner upload quotas, and the row cap applied while an upload streams in.

Three per-owner limits (settings; 0 = no limit), each answered in the error envelope:

- `SDPO_MAX_STORAGE_BYTES_PER_OWNER`: the bytes of an owner's stored (not deleted) files. An upload
  that would pass it is 413 `storage_quota_exceeded`: before its body is read when the owner is
  already at the quota (or its Content-Length says it would pass it), else as soon as the streamed
  bytes pass what is left.
- `SDPO_MAX_FILES_PER_OWNER`: an owner's stored (not deleted) files; 429 `too_many_files`.
- `SDPO_MAX_UPLOADS_PER_MINUTE`: files an owner created in the last 60 s (deleted ones too: deleting
  does not refill the window); 429 `upload_rate_limited` with `Retry-After` (seconds until the
  oldest upload of the window leaves it).

Each is checked twice: `admit_upload` before the body is streamed (a refused request costs one
short query, not a 1 GiB read), and `check_before_insert` in the transaction that inserts the
file's row, under a per-owner lock, so two concurrent uploads cannot both squeeze past a limit
(Postgres: a transaction-scoped advisory lock, as for SDPO_MAX_ACTIVE_JOBS_PER_OWNER; SQLite lets
one writer in at a time). The source of truth is the `files` table itself: no counter to drift,
and every API process sees the same numbers. Refused uploads leave no row, so they do not count
towards the rate; they are bounded by the size and row caps and the API's admission limit.

`capped_upload` wraps the upload's byte stream: it counts rows (non-blank lines, as the validator
counts them) and bytes as they arrive, and stops at row SDPO_MAX_FILE_ROWS + 1 with 400
`too_many_rows`, so a 1.5M-row file is refused after reading its first million rows, not after
storing and parsing all of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from api.files import repository
from core.clock import utcnow
from core.errors import InvalidRequest, PayloadTooLarge, TooManyRequests
from core.models import IdempotencyKey
from core.settings import Settings

RATE_WINDOW = timedelta(seconds=60)
PARQUET_MAGIC = b"PAR1"  # Parquet's row cap is read from its footer instead (files.service)


@dataclass(frozen=True)
class UploadAllowance:
    """What `admit_upload` found: the owner's storage quota (None: none) and stored bytes."""

    quota_bytes: int | None = None
    stored_bytes: int = 0

    @property
    def bytes_left(self) -> int | None:
        return None if self.quota_bytes is None else self.quota_bytes - self.stored_bytes


def _recent_uploads(db: Session, owner: str) -> tuple[int, float]:
    """(files `owner` created in the last minute, seconds until the oldest of them leaves it)."""
    now = utcnow()
    count, oldest = repository.created_since(db, owner, now - RATE_WINDOW)
    if not count or oldest is None:
        return 0, 0.0
    return count, max(0.0, (oldest + RATE_WINDOW - now).total_seconds())


def _quota_error(owner_bytes: int, quota: int, incoming: int | None) -> PayloadTooLarge:
    what = f"this upload ({incoming} bytes) would pass" if incoming else "this owner is at"
    return PayloadTooLarge(
        f"Storage quota exceeded: this owner's files take {owner_bytes} bytes and {what} the quota of "
        f"{quota} bytes (SDPO_MAX_STORAGE_BYTES_PER_OWNER). Delete files you no longer need, then retry. "
        "Nothing was stored.",
        param="file", code="storage_quota_exceeded",
        extra={"stored_bytes": owner_bytes, "quota_bytes": quota})


def _check(db: Session, settings: Settings, owner: str, incoming: int | None) -> UploadAllowance:
    """Raise the first limit `owner` is at; `incoming` is the new file's size when known."""
    if settings.max_uploads_per_minute:
        recent, wait = _recent_uploads(db, owner)
        if recent >= settings.max_uploads_per_minute:
            retry_after = max(1, math.ceil(wait))
            raise TooManyRequests(
                f"Too many uploads: {recent} in the last minute, the most allowed "
                f"(SDPO_MAX_UPLOADS_PER_MINUTE={settings.max_uploads_per_minute}). Retry in {retry_after} s.",
                param=None, code="upload_rate_limited", headers={"Retry-After": str(retry_after)},
                extra={"uploads_last_minute": recent, "limit": settings.max_uploads_per_minute,
                       "retry_after_seconds": retry_after})
    allowance = UploadAllowance()
    if settings.max_files_per_owner or settings.max_storage_bytes_per_owner:
        files, stored = repository.owner_usage(db, owner)
        if settings.max_files_per_owner and files >= settings.max_files_per_owner:
            raise TooManyRequests(
                f"This owner already has {files} files, the most allowed (SDPO_MAX_FILES_PER_OWNER="
                f"{settings.max_files_per_owner}). Delete files you no longer need, then retry.",
                param="file", code="too_many_files", extra={"files": files, "limit": settings.max_files_per_owner})
        quota = settings.max_storage_bytes_per_owner
        if quota:
            allowance = UploadAllowance(quota_bytes=quota, stored_bytes=stored)
            if stored >= quota or (incoming is not None and stored + incoming > quota):
                raise _quota_error(stored, quota, incoming)
    return allowance


def admit_upload(db: Session, settings: Settings, owner: str, content_length: int | None = None, *,
                 idempotency_key: str | None = None) -> UploadAllowance:
    """Before the body is read: refuse an owner at a limit (429/413). `content_length` (the whole
    request's, an upper bound of the file's) refuses early an upload that cannot fit. Reads only.

    A retry under an `idempotency_key` that already has a stored reply is not refused: it creates
    nothing (the reply is replayed, or 409 for a different request) and must not be answered with
    a limit that its first success reached."""
    if idempotency_key is not None and db.get(IdempotencyKey, (owner, idempotency_key)) is not None:
        return UploadAllowance()
    allowance = _check(db, settings, owner, None)
    if (allowance.bytes_left is not None and content_length is not None
            and content_length > allowance.bytes_left + _MULTIPART_SLACK):
        raise _quota_error(allowance.stored_bytes, allowance.quota_bytes, content_length)
    return allowance


# A request's Content-Length also counts the multipart envelope around the file (boundaries, part
# headers, the purpose field): only a request longer than what is left plus this is surely too big.
_MULTIPART_SLACK = 64 * 1024


def check_before_insert(db: Session, settings: Settings, owner: str, new_bytes: int) -> None:
    """In the transaction that inserts the new file's row, before the insert: take the owner's lock
    and check every quota again, this file included."""
    if not (settings.max_uploads_per_minute or settings.max_files_per_owner or settings.max_storage_bytes_per_owner):
        return
    repository.lock_owner_files(db, owner)
    _check(db, settings, owner, new_bytes)


# ------------------------------------------------------------------------------------------------
# The stream guard


class RowCounter:
    """Counts rows in a byte stream fed in arbitrary chunks, the way `sdpo_engine.data` counts them:
    a row is a line (ended by \\n or by the end of the stream) with a non-whitespace byte. Keeps
    O(1) state: only whether the unfinished line has text so far, never the line itself."""

    __slots__ = ("rows", "lines", "_open_has_text")

    def __init__(self) -> None:
        self.rows = 0  # finished rows
        self.lines = 0  # finished lines, blank ones included
        self._open_has_text = False

    def feed(self, chunk: bytes, max_rows: int = 0) -> int | None:
        """Count `chunk`. With `max_rows`, stop at row `max_rows` + 1 and return its line number."""
        pieces = chunk.split(b"\n")
        last = pieces.pop()
        for piece in pieces:
            self.lines += 1
            if self._open_has_text or piece.strip():
                self.rows += 1
                if max_rows and self.rows > max_rows:
                    return self.lines
            self._open_has_text = False
        if not self._open_has_text and last.strip():
            self._open_has_text = True
            if max_rows and self.rows + 1 > max_rows:
                return self.lines + 1
        return None

    @property
    def seen(self) -> int:
        """Rows seen so far, the unfinished line included when it has text."""
        return self.rows + (1 if self._open_has_text else 0)


def capped_upload(chunks: Iterable[bytes], *, max_rows: int,
                  allowance: UploadAllowance | None = None) -> Iterator[bytes]:
    """Pass `chunks` through, stopping with 400 `too_many_rows` as soon as row `max_rows` + 1 is seen
    (0: no cap), and with 413 `storage_quota_exceeded` as soon as the bytes pass the owner's quota.
    Raising stops the caller's read: the rest of the body is never processed (the server closes
    the connection after the error, as for any oversized body)."""
    counter = RowCounter()
    size = 0
    bytes_left = allowance.bytes_left if allowance is not None else None
    head = b""  # the file's first bytes: a Parquet file (magic PAR1) has no lines to count
    for chunk in chunks:
        size += len(chunk)
        if bytes_left is not None and size > bytes_left:
            raise _quota_error(allowance.stored_bytes, allowance.quota_bytes, size)
        if len(head) < len(PARQUET_MAGIC):
            head += chunk[: len(PARQUET_MAGIC) - len(head)]
        if max_rows and head != PARQUET_MAGIC and (line := counter.feed(chunk, max_rows)) is not None:
            raise too_many_rows(max_rows, line=line)
        yield chunk


def too_many_rows(max_rows: int, *, line: int | None = None, rows: int | None = None) -> InvalidRequest:
    """400 `too_many_rows`: `line` is where row `max_rows` + 1 starts when the read stopped there;
    `rows` the file's total when it was read whole."""
    found = f"it has {rows} pairs" if rows is not None else f"line {line} is its pair number {max_rows + 1}"
    extra = {"max_rows": max_rows, **({"rows": rows} if rows is not None else {"line": line})}
    return InvalidRequest(
        f"The file has too many pairs: {found}; this service accepts at most {max_rows} pairs (non-blank "
        "lines) per file (SDPO_MAX_FILE_ROWS). Split it into several files. Nothing was stored.",
        param="file", code="too_many_rows", extra=extra)
