"""Cursor pagination in OpenAI's style: `after` is the id of the last object seen, `limit` the
page size, and the page says `has_more`."""

from __future__ import annotations

from core.errors import InvalidRequest


def check_limit(limit: int | None, *, default: int, maximum: int) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"limit must be between 1 and {maximum}, got {limit}.", param="limit",
                             code="invalid_value")
    return limit
