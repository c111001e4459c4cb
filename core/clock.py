"""Time in one convention: timezone-aware UTC datetimes inside, Unix seconds on the wire."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_unix(value: datetime | None) -> int | None:
    """OpenAI's objects carry integer Unix timestamps."""
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC.
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())
