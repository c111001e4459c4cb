"""Per-process database and storage handles for the worker, and retrying database work.

Built lazily on first use and dropped after a fork (`reset()` from `worker_process_init`), so no
connection is ever shared between the Celery parent and its pool processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from core.db import is_transient_db_error, make_engine, make_session_factory, session_scope
from core.settings import get_settings
from core.storage import make_storage

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0


@lru_cache(maxsize=1)
def _factory():
    return make_session_factory(make_engine(get_settings().database_url))


@lru_cache(maxsize=1)
def storage():
    settings = get_settings()
    return make_storage(settings.storage_dir, settings.storage_url, cache_bytes=settings.storage_cache_bytes)


def reset() -> None:
    if _factory.cache_info().currsize:
        _factory().kw["bind"].dispose(close=False)
    _factory.cache_clear()


@contextmanager
def session():
    """One unit of work (commit on success, rollback on error)."""
    with session_scope(_factory()) as s:
        yield s


def retrying(work: Callable[[], T], *, what: str, seconds: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `work` (which opens its own `session()`), again and again while the database is
    unreachable (a restart, a dropped connection), with a growing pause, for up to `seconds`
    (default `db_retry_seconds`); then the last error is raised.

    `work` must be safe to run twice: a COMMIT whose answer was lost may have been applied, so each
    unit of work checks the state it expects before changing it (the claim's conditional UPDATE,
    a step still `running` with this attempt, an event id already present).
    """
    deadline = time.monotonic() + (get_settings().db_retry_seconds if seconds is None else seconds)
    delay = RETRY_FIRST_DELAY_S
    failures = 0
    while True:
        try:
            result = work()
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + delay > deadline:
                raise
            failures += 1
            log.warning("database unavailable during %s (%s); retrying in %.1f s", what,
                        type(exc.__cause__ or exc).__name__, delay)
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
            continue
        if failures:
            log.warning("database back: %s done after %d retries", what, failures)
        return result
