"""Live events over server-sent events: every event once, in order, across reconnects
(`Last-Event-ID`), then a `done` frame when the job has ended. A real uvicorn server reads the
events that another connection writes to Postgres, as the worker does."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from api import stream
from core.db import session_scope
from core.jobs import add_event
from core.keys import create_api_key, revoke_key
from core.models import Event, Job
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch):
    # The live server runs in this process, so its module constants can be tightened.
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.05)


@pytest.fixture
def job_id(client, upload, user_key, base_model) -> str:
    file_id = upload(user_key, preference_rows(6))["id"]
    response = client.post(JOBS, headers=bearer(user_key), json={"model": "tiny-base", "training_file": file_id})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def read_frames(response: httpx.Response, *, stop_after: int | None = None) -> list[dict]:
    """Parse SSE frames until the stream ends, a `done` frame, or `stop_after` events."""
    frames, fields = [], {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                frames.append({"id": fields.get("id"), "event": fields.get("event", "message"),
                               "data": json.loads(fields["data"])})
                if frames[-1]["event"] == "done":
                    return frames
                if stop_after is not None and len(frames) >= stop_after:
                    return frames
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    return frames


def write_events(session_factory, job_id: str, count: int, *, pause: float = 0.0, finish: bool = False) -> None:
    for i in range(count):
        with session_scope(session_factory) as s:
            add_event(s, job_id, f"metrics {i}", type="metrics", step_index=1,
                      data={"step": 1, "global_step": i + 1, "max_steps": count, "loss": 0.69 - i / 100})
        time.sleep(pause)
    if finish:
        with session_scope(session_factory) as s:
            job = s.get(Job, job_id)
            job.status = "succeeded"
            add_event(s, job_id, "Job succeeded.")


def all_event_ids(session_factory, job_id: str) -> list[str]:
    with session_factory() as s:
        return [e.id for e in s.query(Event).filter_by(job_id=job_id).order_by(Event.seq)]


def test_stream_receives_every_event_in_order_across_a_reconnect(live_server, session_factory, user_key, job_id):
    write_events(session_factory, job_id, 5)
    url = f"{live_server}{JOBS}/{job_id}/events"
    with httpx.Client(headers=bearer(user_key), timeout=30) as http:
        # First connection: the backlog, then live events, then the client drops the connection.
        writer = threading.Thread(target=write_events, args=(session_factory, job_id, 10), kwargs={"pause": 0.02})
        with http.stream("GET", url, params={"stream": "true"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            writer.start()
            first = read_frames(response, stop_after=8)
        writer.join()
        # Written while nobody listens; the job then ends.
        write_events(session_factory, job_id, 7, finish=True)
        # Reconnect from the last event received: the rest, exactly once, then `done`.
        with http.stream("GET", url, params={"stream": "true"},
                         headers={"Last-Event-ID": first[-1]["id"]}) as response:
            assert response.status_code == 200
            second = read_frames(response)

    assert second[-1]["event"] == "done" and second[-1]["data"]["status"] == "succeeded"
    received = [f["id"] for f in first + second[:-1]]
    assert received == all_event_ids(session_factory, job_id), "events missing, repeated or out of order"
    assert all(f["id"] == f["data"]["id"] and f["data"]["object"] == "fine_tuning.job.event" for f in first)
    # Metrics keep their numbers; a lifecycle message is a message.
    assert first[-1]["data"]["type"] == "metrics" and "loss" in first[-1]["data"]["data"]
    assert second[-2]["data"]["message"] == "Job succeeded."


def test_server_closes_long_streams_and_the_client_resumes(live_server, session_factory, user_key, job_id,
                                                           monkeypatch):
    monkeypatch.setattr(stream, "MAX_STREAM_SECONDS", 0.3)
    writer = threading.Thread(target=write_events, args=(session_factory, job_id, 12),
                              kwargs={"pause": 0.1, "finish": True})
    writer.start()
    received, last_id, connections = [], None, 0
    with httpx.Client(headers=bearer(user_key), timeout=30) as http:
        while True:
            connections += 1
            headers = {"Last-Event-ID": last_id} if last_id else {}
            with http.stream("GET", f"{live_server}{JOBS}/{job_id}/events", params={"stream": "true"},
                             headers=headers) as response:
                frames = read_frames(response)
            events = [f for f in frames if f["event"] != "done"]
            received += [f["id"] for f in events]
            last_id = received[-1] if received else None
            if frames and frames[-1]["event"] == "done":
                break
            assert connections < 100
    writer.join()
    assert connections > 1, "the server never closed a stream"
    assert received == all_event_ids(session_factory, job_id)


def test_stream_errors(client, user_key, other_key, job_id):
    url = f"{JOBS}/{job_id}/events"
    unknown = client.get(url, params={"stream": "true"}, headers={**bearer(user_key), "Last-Event-ID": "ftevent-x"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_cursor"
    assert client.get(url, params={"stream": "true"}, headers=bearer(other_key)).status_code == 404
    assert client.get(url, params={"stream": "true"}).status_code == 401
    # Without stream=true it is still OpenAI's list, newest first.
    listed = client.get(url, headers=bearer(user_key)).json()
    assert listed["object"] == "list" and listed["data"][0]["message"].startswith("Created fine-tuning job")


def test_a_finished_job_streams_its_history_and_ends(client, session_factory, user_key, job_id):
    write_events(session_factory, job_id, 3, finish=True)
    response = client.get(f"{JOBS}/{job_id}/events", params={"stream": "true"}, headers=bearer(user_key))
    assert response.status_code == 200
    frames = read_frames(response)
    assert [f["id"] for f in frames[:-1]] == all_event_ids(session_factory, job_id)
    assert frames[-1] == {"id": None, "event": "done",
                          "data": {"status": "succeeded", "fine_tuning_job_id": job_id}}


# ------------------------------------------------------------------------------------------------
# Revocation (issue #20, kind 4; many streams at once: tests/api/test_slow_clients.py)


def test_a_stream_ends_within_a_poll_when_its_key_is_revoked(live_server, session_factory, job_id, monkeypatch):
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.5)
    with session_scope(session_factory) as s:
        row, key = create_api_key(s, name="alice-laptop", owner="alice")
        key_id = row.id
    url = f"{live_server}{JOBS}/{job_id}/events"
    lines: list[str] = []
    ended = threading.Event()
    ready = threading.Event()

    def follow() -> None:
        with httpx.Client(headers=bearer(key), timeout=30) as http, \
                http.stream("GET", url, params={"stream": "true"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("id: "):
                    ready.set()
        ended.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert ready.wait(10), "no event arrived"
    time.sleep(0.3)
    assert not ended.is_set()
    with session_scope(session_factory) as s:
        revoke_key(s, key_id)
    revoked = time.monotonic()
    assert ended.wait(stream.POLL_SECONDS + 1.0), "the stream outlived its key's revocation"
    assert time.monotonic() - revoked <= stream.POLL_SECONDS + 0.5
    assert any("revoked" in line for line in lines if line.startswith(":"))
    assert not any(line.startswith("event: done") for line in lines)
    # Reconnecting with the revoked key: 401 in the envelope.
    again = httpx.get(url, params={"stream": "true"}, headers=bearer(key), timeout=10)
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_api_key"
