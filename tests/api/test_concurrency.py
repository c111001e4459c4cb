"""The in-flight request limit (api/concurrency.py): many more concurrent requests than database
connections are all answered, none stalls on the pool; a request that cannot get a slot in time
gets 503 server_busy; probes are never queued."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx

from api.concurrency import ConcurrencyLimit
from tests.conftest import bearer


def test_far_more_clients_than_connections_are_all_served(make_live_server, user_key):
    """2 pooled connections, 60 concurrent authenticated requests. Without the limit, the key check's
    session holds a connection while the endpoint waits for a thread, every thread waits for a
    connection, and requests hang until the pool's 30 s timeout."""
    url = make_live_server(db_pool_size=2, db_max_overflow=0, api_max_concurrency=1)

    def get(_):
        return httpx.get(url + "/v1/files", headers=bearer(user_key), timeout=20).status_code

    with ThreadPoolExecutor(60) as pool:
        codes = list(pool.map(get, range(60)))
    assert codes == [200] * 60


def _run(coro):
    return asyncio.run(coro)


def test_a_request_that_waits_too_long_gets_503_and_probes_pass():
    """A slot is held from admission to the response's start: a request (an event stream's setup
    too) that cannot get one in time is 503; probes never wait; a response that has started
    (a stream sending for minutes) no longer holds its slot."""
    release = asyncio.Event()
    entered = []

    async def app(scope, receive, send):
        entered.append(scope["path"])
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/streaming":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await release.wait()
        await send({"type": "http.response.body", "body": b"ok"})

    limited = ConcurrencyLimit(app, limit=1, queue_seconds=0.2)

    async def call(path: str, query: bytes = b"") -> tuple[int, bytes, dict]:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        await limited({"type": "http", "path": path, "query_string": query}, receive, send)
        headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
        return sent[0]["status"], sent[-1]["body"], headers

    async def scenario():
        slow = asyncio.create_task(call("/slow"))
        await asyncio.sleep(0.05)
        busy = await call("/v1/files")
        probe = await call("/healthz")
        stream_setup = await call("/v1/fine_tuning/jobs/x/events", b"stream=true")
        release.set()
        first = await slow
        after = await call("/v1/files")
        # A started response gives its slot back: with limit 1, a request is served meanwhile.
        release.clear()
        streaming = asyncio.create_task(call("/streaming"))
        await asyncio.sleep(0.05)
        during = await call("/v1/files")
        release.set()
        await streaming
        return busy, probe, stream_setup, first, after, during

    busy, probe, stream_setup, first, after, during = _run(scenario())
    assert busy[0] == 503 and b"server_busy" in busy[1] and busy[2]["retry-after"] == "1"
    assert stream_setup[0] == 503 and b"server_busy" in stream_setup[1]
    assert probe[0] == 200 and first[0] == 200 and after[0] == 200 and during[0] == 200
