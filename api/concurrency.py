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

A slot covers a request until its response starts: the key check, reading the body, the endpoint
and building the response. It is given back at `http.response.start`, when the request's database
session is already closed (api/deps.py), so sending the body (a download to a slow reader, a live
event stream for minutes) holds neither a slot nor a connection. A live event stream's setup waits
for a slot like any request; its polls afterwards are short, self-contained thread-pool calls (a
thread and a connection for a moment, never one while waiting for the other).

Not counted: probes and static files (no session).
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_FREE_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")
_FREE_PREFIXES = ("/ui",)


def _counted(scope: Scope) -> bool:
    path = scope.get("path", "")
    return not (path in _FREE_PATHS or path.startswith(_FREE_PREFIXES))


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
        slots, held = self._slots, True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start":
                give_back()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            give_back()


async def _busy(send: Send, waited: float) -> None:
    body = json.dumps({"error": {
        "message": f"The server is busy: the request waited {waited:.0f} s for a free slot. Retry shortly.",
        "type": "server_error", "param": None, "code": "server_busy"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
