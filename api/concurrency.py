"""At most `SDPO_API_MAX_CONCURRENCY` requests inside the app at once; the rest wait in the event loop.

Why: FastAPI runs a sync dependency and the sync endpoint in *separate* thread-pool calls, and the
request's database session (opened by the key check) keeps its pooled connection between them. With
more requests in flight than the pool has connections, every thread-pool thread can end up blocked
waiting for a connection that is held by a request waiting for a thread: the API stalls until the
pool's 30 s timeout (measured: 200 clients on Postgres, every request timed out). Bounding requests
in flight below the pool's size (checked in `core.settings`) means a request never waits for a
connection held by a request that waits for it; excess requests queue here without a thread or a
connection, in arrival order, and get 503 `server_busy` (with Retry-After) after
`SDPO_API_QUEUE_SECONDS`.

Not counted: probes and static files (no session), and the work done by a live event stream (it
reads the database in short, self-contained thread-pool calls and may stay open for minutes).
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Receive, Scope, Send

_FREE_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")
_FREE_PREFIXES = ("/ui",)


def _counted(scope: Scope) -> bool:
    path = scope.get("path", "")
    if path in _FREE_PATHS or path.startswith(_FREE_PREFIXES):
        return False
    if path.endswith("/events") and b"stream=true" in scope.get("query_string", b""):
        return False
    return True


class ConcurrencyLimit:
    def __init__(self, app: ASGIApp, *, limit: int, queue_seconds: float):
        self.app, self.limit, self.queue_seconds = app, limit, queue_seconds
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _counted(scope):
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_seconds)
        except TimeoutError:
            await _busy(send, self.queue_seconds)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()


async def _busy(send: Send, waited: float) -> None:
    body = json.dumps({"error": {
        "message": f"The server is busy: the request waited {waited:.0f} s for a free slot. Retry shortly.",
        "type": "server_error", "param": None, "code": "server_busy"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
