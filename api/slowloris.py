"""A minimum data rate for request bodies, so a client that sends slowly cannot hold a request open.

A request that reads its body holds an admission slot (api/concurrency.py) and, for an upload, a
thread-pool thread until the body has arrived. A client trickling a byte a second would keep both
for as long as it likes; enough such clients would leave nothing for anyone else. The rule, as
Apache's mod_reqtimeout `body=…,MinRate=…`:

- the body may take `SDPO_UPLOAD_RATE_GRACE_SECONDS` (30) before any rate applies, and every byte
  received buys `1 / SDPO_UPLOAD_MIN_BYTES_PER_SECOND` seconds more (at the default 16 KiB/s a
  1 MiB JSON body has 94 s, a 1 GiB upload about 18 h);
- and it may never go silent for longer than the grace period.

Past either limit the request ends with 408 `request_timeout` in the error envelope (the client
has not finished sending, so the connection is closed after the reply).

It also enforces the rule of api/deps.py: the request's session must have no transaction open
when the body starts to arrive (RuntimeError otherwise: a 500 that tests catch).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
from fastapi import Request

from core.errors import InvalidRequest


def request_timeout(received: int, elapsed: float, min_rate: int) -> InvalidRequest:
    """The 408 for a body that has sent `received` bytes in `elapsed` seconds."""
    return InvalidRequest(
        f"The request body arrived too slowly: {received} bytes in {elapsed:.0f} s. The server needs at "
        f"least {min_rate} bytes per second after the first seconds (SDPO_UPLOAD_MIN_BYTES_PER_SECOND).",
        code="request_timeout", status=408)


async def rate_limited_body(request: Request) -> AsyncIterator[bytes]:
    """`request.stream()` under the app's minimum body rate (settings of `request.app`): the body's
    chunks as they arrive; raises the 408 InvalidRequest when the client falls behind."""
    session = getattr(request.state, "db_session", None)
    if session is not None and session.in_transaction():
        # A bug, not the client's doing: the transaction (SQLite's write lock, a pooled connection)
        # would be held for as long as the client takes to send. Read in a session of its own.
        raise RuntimeError("the request's database session has a transaction open while its body is read")
    settings = request.app.state.services.settings
    min_rate, grace = settings.upload_min_bytes_per_second, settings.upload_rate_grace_seconds
    stream = request.stream()
    if not min_rate:
        async for chunk in stream:
            yield chunk
        return
    chunks = stream.__aiter__()
    started = time.monotonic()
    received = 0
    try:
        while True:
            now = time.monotonic()
            # Rate rule and silence rule together: whichever ends first.
            wait = min(started + grace + received / min_rate, now + grace) - now
            if wait <= 0:
                raise request_timeout(received, now - started, min_rate)
            chunk = None
            with anyio.move_on_after(wait):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if chunk is None:
                raise request_timeout(received, time.monotonic() - started, min_rate)
            received += len(chunk)
            yield chunk
    finally:
        await stream.aclose()
