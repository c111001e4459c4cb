"""Time in one convention: timezone-aware UTC datetimes inside, Unix seconds on the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def to_unix(value: datetime) -> int: ...
@overload
def to_unix(value: None) -> None: ...
@overload
def to_unix(value: datetime | None) -> int | None: ...


def to_unix(value: datetime | None) -> int | None:
    """Unix seconds of `value` (None for None): OpenAI's objects carry integer Unix timestamps."""
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC.
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())
