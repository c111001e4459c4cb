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

The database is polled with a short session per poll: no connection is held between polls, and
it works the same on Postgres and SQLite wherever the writer is (API, worker, another host).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.jobs.schemas import event_object
from core.models import Event, Job
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


def _poll(factory: sessionmaker[Session], job_id: str, after_seq: int) -> tuple[list[tuple[int, dict]], str | None]:
    """Events after `after_seq` (oldest first) and the job's status, read in that order so that a
    terminal status means every event written with it or before it is already in the batch."""
    with factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(select(Event).where(Event.job_id == job_id, Event.seq > after_seq)
                               .order_by(Event.seq).limit(BATCH)).all()
        return [(e.seq, event_object(e)) for e in rows], status


async def job_event_stream(factory: sessionmaker[Session], job_id: str, after_seq: int) -> AsyncIterator[str]:
    """The SSE body for one job, starting after the event numbered `after_seq` (0: from the start)."""
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    cursor = after_seq
    while True:
        events, status = await run_in_threadpool(_poll, factory, job_id, cursor)
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
