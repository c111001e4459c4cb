"""Per-process database and storage handles for the worker.

Built lazily on first use and dropped after a fork (`reset()` from `worker_process_init`), so no
connection is ever shared between the Celery parent and its pool processes.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

from core.db import make_engine, make_session_factory, session_scope
from core.settings import get_settings
from core.storage import make_storage


@lru_cache(maxsize=1)
def _factory():
    return make_session_factory(make_engine(get_settings().database_url))


@lru_cache(maxsize=1)
def storage():
    return make_storage(get_settings().storage_dir)


def reset() -> None:
    if _factory.cache_info().currsize:
        _factory().kw["bind"].dispose(close=False)
    _factory.cache_clear()


@contextmanager
def session():
    """One unit of work (commit on success, rollback on error)."""
    with session_scope(_factory()) as s:
        yield s
