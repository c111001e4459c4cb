"""Live job events as server-sent events: `GET /v1/fine_tuning/jobs/{id}/events?stream=true`.

Every event of the job is sent once, oldest first (the integer `seq` orders them), as

    id: ftevent-…
    data: {"id": "ftevent-…", "object": "fine_tuning.job.event", "type": "metrics", "data": {…}, …}

A client that reconnects sends the last id it received as `Last-Event-ID` (browsers' EventSource
does so by itself) and gets exactly the events after it, so nothing is lost or repeated. When the
job has finished and every event has been sent, a last `event: done` frame carries the job's
status and the stream ends. Comment lines keep idle connections open through proxies, and a
connection is closed after `MAX_STREAM_SECONDS` (the client resumes with `Last-Event-ID`), so a
deploy never waits on streams that would otherwise never end.

The database is polled with a short read-only session per poll: no connection is held between
polls, no write lock is ever taken, and it works the same on Postgres and SQLite wherever the writer
is (API, worker, another host). Each poll also re-checks the caller: once its key is revoked (or
deleted) the stream ends at the next poll, with a comment line saying why; a reconnect then gets
401.

Open streams are counted per API key (`SDPO_MAX_STREAMS_PER_KEY`, per API process): one more is
429 `too_many_streams`. A stream's setup (key check, job lookup) waits for an admission slot like
any request (api/concurrency.py); the slot is given back when the stream's response starts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from api.jobs.schemas import EventObject
from core.db import read_only_session
from core.errors import TooManyRequests
from core.jobs import repository
from core.keys import is_key_active
from core.states import JOB_TERMINAL

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 900.0
BATCH = 500
RETRY_MS = 1000

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
MEDIA_TYPE = "text/event-stream"


def frame(data: Any, *, event_id: str | None = None, event: str | None = None) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    # json.dumps never emits a raw newline, so the payload is one `data:` line.
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines) + "\n\n"


class _Revoked(Exception):
    """The stream's key was revoked (or deleted) while it was open."""


def _poll(factory: sessionmaker[Session], job_id: str, after_seq: int, *, key_id: str,
          owner: str) -> tuple[list[tuple[int, dict]], str | None]:
    """Events after `after_seq` (oldest first) and the job's status, read in that order so that a
    terminal status means every event written with it or before it is already in the batch.
    Raises _Revoked when the key `key_id` is no longer valid; a job no longer owned by `owner`
    reads as gone (status None)."""
    with read_only_session(factory) as session:
        if not is_key_active(session, key_id):
            raise _Revoked
        status = repository.owned_job_status(session, job_id, owner)
        if status is None:
            return [], None
        rows = repository.events_after(session, job_id, after_seq, limit=BATCH)
        return [(e.seq, EventObject.from_row(e).model_dump(mode="json")) for e in rows], status


async def job_event_stream(factory: sessionmaker[Session], job_id: str, after_seq: int, *, key_id: str,
                           owner: str) -> AsyncIterator[str]:
    """The SSE body for one job, starting after the event numbered `after_seq` (0: from the start),
    for the caller whose key is `key_id` and owner `owner` (both re-checked at every poll)."""
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    cursor = after_seq
    while True:
        try:
            events, status = await run_in_threadpool(_poll, factory, job_id, cursor, key_id=key_id, owner=owner)
        except _Revoked:
            # A comment (every client ignores it) rather than a frame a client would take for an
            # event; the client's reconnect gets the 401 envelope.
            yield ": the API key of this stream was revoked\n\n"
            return
        for seq, body in events:
            cursor = seq
            yield frame(body, event_id=body["id"])
        if events:
            last_sent = time.monotonic()
        if status is None or (status in JOB_TERMINAL and len(events) < BATCH):
            yield frame({"status": status, "fine_tuning_job_id": job_id}, event="done")
            return
        if len(events) == BATCH:
            continue  # a backlog: send the rest before sleeping
        now = time.monotonic()
        if now - started > MAX_STREAM_SECONDS:
            return
        if now - last_sent > KEEPALIVE_SECONDS:
            last_sent = now
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS)


# ----------------------------------------------------------------------------------------------
# Open streams per key


class OpenStreams:
    """Open event streams per API key in this process, under a cap (`SDPO_MAX_STREAMS_PER_KEY`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def count(self, key_id: str) -> int:
        with self._lock:
            return self._open.get(key_id, 0)

    def acquire(self, key_id: str, limit: int) -> Callable[[], None]:
        """Count one more stream of `key_id`; return the function (safe to call twice) that
        uncounts it. 429 `too_many_streams` when `limit` (> 0) streams are open already."""
        with self._lock:
            current = self._open.get(key_id, 0)
            if limit and current >= limit:
                raise TooManyRequests(
                    f"This API key has {current} live event streams open, the most allowed "
                    "(SDPO_MAX_STREAMS_PER_KEY). Close one first.", code="too_many_streams")
            self._open[key_id] = current + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open.get(key_id, 1) - 1
                if left > 0:
                    self._open[key_id] = left
                else:
                    self._open.pop(key_id, None)

        return release


def open_streams(app: Any) -> OpenStreams:
    """The app's stream counter (one per app, made on first use)."""
    counter = getattr(app.state, "open_streams", None)
    if counter is None:
        with _APP_LOCK:
            counter = getattr(app.state, "open_streams", None)
            if counter is None:
                counter = app.state.open_streams = OpenStreams()
    return counter


_APP_LOCK = threading.Lock()


class EventStreamResponse(StreamingResponse):
    """The SSE response; `release` (a stream slot's) runs when it ends, however it ends: finished,
    the client gone, an error, or the response never sent at all (when it is garbage-collected)."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(body, media_type=MEDIA_TYPE, headers=HEADERS)
        self._release = release
        weakref.finalize(self, release)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
