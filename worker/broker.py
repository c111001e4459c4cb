"""Asking the broker whether it still holds a job's message (for `flows.resend_lost_work`).

Celery cannot tell whether a message exists, so this looks where each transport keeps them:

- Redis: the queue lists (kombu adds a list per priority level) and the `unacked` hash of
  messages delivered to a worker but not yet acknowledged. Every message carries its task's
  arguments in plain text (`argsrepr` in its headers), and so the job id.
- kombu's SQLAlchemy transport (the embedded mode): the rows still visible in `kombu_message`.
  A row taken by a worker is invisible whether its task still runs or died with its worker (this
  transport never redelivers), so between start-ups this transport is trusted; at a worker's
  start-up a taken row cannot belong to a running task of that worker.
- anything else: trusted, except at start-up (nothing is known held).

A message found where it was just moved from (a list to `unacked`) may be missed, and the job sent
again: the step claim makes such a duplicate harmless. The opposite error (a message reported
held that is gone) cannot happen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from core.settings import Settings

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's default `unacked_key`


def jobs_with_messages(settings: Settings, job_ids: Iterable[str], *, startup: bool = False) -> set[str] | None:
    """The ids among `job_ids` that some broker message names; None when unknown (trust the broker)."""
    job_ids = list(job_ids)
    url = str(settings.broker_url)
    try:
        if url.startswith(("redis://", "rediss://")):
            payloads = _redis_payloads(url, [settings.light_queue, settings.train_queue])
        elif url.startswith("sqla+"):
            if not startup:
                return None
            payloads = _sqlalchemy_payloads(url[len("sqla+"):])
        else:
            return set() if startup else None
    except Exception:
        log.warning("could not look into the broker; trusting it this time", exc_info=True)
        return None
    return {job_id for job_id in job_ids if any(job_id.encode() in p for p in payloads)}


def _redis_payloads(url: str, queues: list[str]) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        payloads: list[bytes] = []
        for queue in queues:
            # The plain list, and kombu's per-priority lists `<queue>\x06\x16<n>`.
            for key in client.scan_iter(match=_glob_escape(queue) + "*", count=1000):
                if client.type(key) == b"list":
                    payloads += _as_bytes(client.lrange(key, 0, -1))
        payloads += _as_bytes(client.hvals(UNACKED_KEY))
        return payloads
    finally:
        client.close()


def _as_bytes(values: list[bytes | str]) -> list[bytes]:
    # redis-py types replies as bytes or str (str with decode_responses=True, which this client
    # does not set): bytes as they are, text as UTF-8
    return [v if isinstance(v, bytes) else v.encode() for v in values]


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _sqlalchemy_payloads(url: str) -> list[bytes]:
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url)
    try:
        if not inspect(engine).has_table("kombu_message"):
            return []
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT payload FROM kombu_message WHERE visible")).scalars()
            return [row.encode() if isinstance(row, str) else bytes(row) for row in rows]
    finally:
        engine.dispose()
