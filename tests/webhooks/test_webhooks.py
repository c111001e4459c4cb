"""Webhooks: registration over the API, the outbox written with every job and step status change,
and delivery by a real Celery worker (beat) to a local receiver that checks the HMAC signature:
signed deliveries are accepted, retried with backoff after a failure, and a receiver that does
not know the secret rejects every attempt until the delivery is marked failed."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import httpx
import pytest

from core import ids
from core.clock import utcnow
from core.db import make_engine, make_session_factory, session_scope
from core.models import IdempotencyKey, Job, JobStep, WebhookDelivery
from core.states import JobStatus, StepStatus, transition
from core.webhooks import EVENT_TYPES, InvalidSignature, retry_delay, sign, signed_headers, verify_signature
from tests.conftest import bearer, preference_rows
from tests.e2e.conftest import sample_files, upload
from tests.webhooks.conftest import Listener, start_worker_with_beat

HOOKS = "/v1/webhooks"


# ------------------------------------------------------------------------------------------------
# Signing (the receiver's side)


def test_signature_round_trip_and_rejections():
    secret = "whsec_" + "c2VjcmV0LWtleS1ieXRlcy0xMjM0NTY3OA=="
    body = b'{"type":"job.succeeded"}'
    headers = signed_headers(secret, "whdel-1", body, timestamp=1_000_000)
    verify_signature(secret, headers, body, now=1_000_010)
    bad = [
        (secret, headers, body + b" ", 1_000_010),  # body changed
        ("whsec_" + "b3RoZXItc2VjcmV0LWJ5dGVzLTEyMzQ1Njc4", headers, body, 1_000_010),  # another secret
        (secret, {**headers, "webhook-id": "whdel-2"}, body, 1_000_010),  # id swapped
        (secret, headers, body, 1_000_000 + 3600),  # replayed an hour later
        (secret, {k: v for k, v in headers.items() if k != "webhook-signature"}, body, 1_000_010),
    ]
    for key, h, b, now in bad:
        with pytest.raises(InvalidSignature):
            verify_signature(key, h, b, now=now)
    # Several signatures (secret rotation): one match is enough.
    rotated = {**headers, "webhook-signature": "v1,AAAA " + headers["webhook-signature"]}
    verify_signature(secret, rotated, body, now=1_000_010)
    assert sign(secret, "whdel-1", 1_000_000, body).startswith("v1,")
    assert [retry_delay(n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]


# ------------------------------------------------------------------------------------------------
# Registration and the outbox (in-process API, the session's database)


@pytest.fixture
def api_client(clean_state, client):
    return client


def test_register_list_delete_and_isolation(api_client, user_key, other_key):
    client = api_client
    r = client.post(HOOKS, headers=bearer(user_key), json={"url": "https://example.test/hook",
                                                           "events": ["job.failed", "job.succeeded"]})
    assert r.status_code == 200, r.text
    hook = r.json()
    assert hook["id"].startswith("wh-") and hook["secret"].startswith("whsec_")
    assert hook["events"] == ["job.succeeded", "job.failed"]
    listed = client.get(HOOKS, headers=bearer(user_key)).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]] and listed[0]["secret"] is None  # shown once
    assert client.get(f"{HOOKS}/{hook['id']}", headers=bearer(other_key)).status_code == 404
    assert client.get(HOOKS, headers=bearer(other_key)).json()["data"] == []
    assert client.delete(f"{HOOKS}/{hook['id']}", headers=bearer(other_key)).status_code == 404
    assert client.delete(f"{HOOKS}/{hook['id']}", headers=bearer(user_key)).json()["deleted"] is True
    assert client.get(HOOKS, headers=bearer(user_key)).json()["data"] == []
    assert client.get(HOOKS).status_code == 401


def test_a_replayed_create_does_not_show_the_secret_again(api_client, db, user_key):
    """The secret is in the first response only: the stored reply that an Idempotency-Key replay
    returns has none, and no stored idempotent reply holds it."""
    headers = {**bearer(user_key), "Idempotency-Key": "hook-1"}
    body = {"url": "https://example.test/hook"}
    first = api_client.post(HOOKS, headers=headers, json=body)
    assert first.status_code == 200 and first.json()["secret"].startswith("whsec_")
    replay = api_client.post(HOOKS, headers=headers, json=body)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == {**first.json(), "secret": None}
    db.rollback()
    stored = db.query(IdempotencyKey).all()
    assert len(stored) == 1 and first.json()["secret"] not in json.dumps(stored[0].response_body)
    assert len(api_client.get(HOOKS, headers=bearer(user_key)).json()["data"]) == 1  # created once


@pytest.mark.parametrize("body, param", [
    ({"url": "ftp://example.test/x"}, "url"),
    ({"url": "/relative"}, "url"),
    ({"url": "https://user:pw@example.test/x"}, "url"),
    ({"url": "https://example.test/x", "events": ["job.exploded"]}, "events[0]"),
    ({"url": "https://example.test/x", "events": []}, "events"),
    ({"url": "https://example.test/x", "secret": "mine"}, "secret"),
    ({}, "url"),
])
def test_bad_registrations_are_400(api_client, user_key, body, param):
    r = api_client.post(HOOKS, headers=bearer(user_key), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_status_changes_write_the_outbox_in_their_transaction(api_client, db, upload, user_key, other_key,
                                                               base_model):
    client = api_client
    mine = client.post(HOOKS, headers=bearer(user_key), json={"url": "https://example.test/a"}).json()
    client.post(HOOKS, headers=bearer(other_key), json={"url": "https://example.test/b"})  # bob's: never told
    file_id = upload(user_key, preference_rows(6))["id"]
    body = {"model": "tiny-base", "training_file": file_id,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}
    job = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json=body).json()
    assert db.query(WebhookDelivery).count() == 0  # created and queued: nothing to tell
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=bearer(user_key))
    db.rollback()
    rows = db.query(WebhookDelivery).all()
    assert [(r.event_type, r.webhook_id, r.owner) for r in rows] == [("job.cancelled", mine["id"], "alice")]
    assert rows[0].payload["data"]["job"]["status"] == "cancelled" and rows[0].payload["id"] == rows[0].id

    # A rolled-back change leaves no notification behind.
    other = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json=body).json()
    row = db.get(Job, other["id"])
    transition(row, JobStatus.CANCELLED)
    db.flush()
    assert db.query(WebhookDelivery).count() == 2
    db.rollback()
    assert db.query(WebhookDelivery).count() == 1
    listed = client.get(f"{HOOKS}/{mine['id']}/deliveries", headers=bearer(user_key)).json()["data"]
    assert [d["event_type"] for d in listed] == ["job.cancelled"] and listed[0]["status"] == "pending"


# ------------------------------------------------------------------------------------------------
# Delivery by the worker, to a local receiver


def _wait_for(check, timeout: float, what: str, service):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{service.logs()}")


def _worker_transitions(database_url: str, owner: str, model: str, file_id: str) -> tuple[str, str]:
    """Two jobs moved through their steps the way worker.flows does (transition() in a
    transaction): one fails at step 2, one succeeds."""
    factory = make_session_factory(make_engine(database_url))
    job_ids = []
    for outcome in ("failed", "succeeded"):
        with session_scope(factory) as s:
            job = Job(id=ids.new_id(ids.JOB), owner=owner, model=model, model_id=model, training_file_id=file_id,
                      method={"type": "sdpo"}, hyperparameters={}, n_steps=2, status="running", seed=0, current_step=1)
            s.add(job)
            for k in (1, 2):
                s.add(JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=k, status="running" if k == 1 else "pending",
                              hyperparameters={}))
            job_ids.append(job.id)
        with session_scope(factory) as s:
            step = s.query(JobStep).filter_by(job_id=job_ids[-1], index=1).one()
            step.metrics = {"first_loss": 0.6931, "last_loss": 0.4}
            transition(step, StepStatus.SUCCEEDED)
            transition(s.query(JobStep).filter_by(job_id=job_ids[-1], index=2).one(), StepStatus.QUEUED)
        with session_scope(factory) as s:
            job = s.get(Job, job_ids[-1])
            step = s.query(JobStep).filter_by(job_id=job.id, index=2).one()
            transition(step, StepStatus.RUNNING)
            job.current_step = 2
        with session_scope(factory) as s:
            job = s.get(Job, job_ids[-1])
            step = s.query(JobStep).filter_by(job_id=job.id, index=2).one()
            if outcome == "failed":
                step.error = {"code": "step_failed", "message": "Step 2 failed: boom"}
                transition(step, StepStatus.FAILED)
                job.error = {"code": "step_failed", "message": "Step 2 failed: boom", "param": None}
                transition(job, JobStatus.FAILED)
            else:
                transition(step, StepStatus.SUCCEEDED)
                job.fine_tuned_model = f"ft:{model}:{owner}::{job.id}"
                transition(job, JobStatus.SUCCEEDED)
    factory.kw["bind"].dispose()
    return job_ids[0], job_ids[1]


def test_worker_delivers_signed_webhooks_retries_and_gives_up_on_rejection(service, receiver, tmp_path):
    service.env.update({"SDPO_WEBHOOK_RETRY_BASE_SECONDS": "0.5", "SDPO_WEBHOOK_MAX_ATTEMPTS": "3",
                        "SDPO_WEBHOOK_DISPATCH_SECONDS": "0.3"})
    service.start_api()
    start_worker_with_beat(service, "light")
    client = service.client()

    good = client.post(HOOKS, json={"url": receiver.url + "/good", "description": "all events"}).json()
    receiver.secrets["/good"] = good["secret"]
    receiver.fail_first.add("/good")  # the very first delivery gets a 503 and must be retried
    wrong = client.post(HOOKS, json={"url": receiver.url + "/wrong", "events": ["job.cancelled"]}).json()
    receiver.secrets["/wrong"] = "whsec_" + "d3Jvbmctc2VjcmV0LWJ5dGVzLTEyMzQ1Njc4"  # not this webhook's secret

    train, _ = sample_files(tmp_path)
    file_id = upload(client, train)
    body = {"model": "sdpo-tiny", "training_file": file_id,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}
    cancelled = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
    failed, succeeded = _worker_transitions(service.database_url, "admin", "sdpo-tiny", file_id)

    expected = {(cancelled, "job.cancelled", None), (failed, "step.succeeded", 1), (failed, "step.failed", 2),
                (failed, "job.failed", None), (succeeded, "step.succeeded", 1), (succeeded, "step.succeeded", 2),
                (succeeded, "job.succeeded", None)}
    assert {e for _, e, _ in expected} == set(EVENT_TYPES)

    def received():
        got = receiver.accepted("/good")
        keys = {(e["data"]["job"]["id"], e["type"], (e["data"].get("step") or {}).get("index")) for e in got}
        return got if keys >= expected else None

    events = _wait_for(received, 60, "every event at the good receiver", service)
    assert len({e["id"] for e in events}) == len(events) == len(expected)  # each once
    by_job = {}
    for e in events:
        by_job.setdefault(e["data"]["job"]["id"], []).append(e)
    # Per job, in the order the changes happened: steps in order, the job's own event last.
    assert [e["type"] for e in by_job[failed]] == ["step.succeeded", "step.failed", "job.failed"]
    assert [e["type"] for e in by_job[succeeded]] == ["step.succeeded", "step.succeeded", "job.succeeded"]
    assert [e["data"]["step"]["index"] for e in by_job[succeeded][:2]] == [1, 2]
    fail_event = next(e for e in by_job[failed] if e["type"] == "step.failed")
    assert fail_event["data"]["step"]["error"]["message"] == "Step 2 failed: boom"
    done = next(e for e in by_job[succeeded] if e["type"] == "job.succeeded")
    assert done["data"]["job"]["fine_tuned_model"].startswith("ft:sdpo-tiny:admin")
    # Every accepted request carried the Standard Webhooks headers; the first one was retried.
    first = receiver.on("/good")[0]
    assert first["status"] == 503 and first["verdict"] == "ok"
    assert any(r["headers"]["webhook-id"] == first["headers"]["webhook-id"] and r["status"] == 200
               for r in receiver.on("/good")[1:])

    # The receiver with the wrong secret rejects every attempt: 3 attempts with growing waits, then failed.
    def gave_up():
        data = client.get(f"{HOOKS}/{wrong['id']}/deliveries").json()["data"]
        return data if data and data[0]["status"] == "failed" else None

    deliveries = _wait_for(gave_up, 60, "the rejected delivery to fail", service)
    assert deliveries[0]["attempts"] == 3 and deliveries[0]["last_status_code"] == 401
    attempts = receiver.on("/wrong")
    assert len(attempts) == 3 and all(a["verdict"].startswith("rejected") for a in attempts)
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9, f"no backoff between attempts: {gaps}"
    good_deliveries = client.get(f"{HOOKS}/{good['id']}/deliveries", params={"limit": 100}).json()["data"]
    assert {d["status"] for d in good_deliveries} == {"delivered"}

    # The receiver also refuses a forged or altered request sent by someone else.
    body_bytes = json.dumps(events[0]).encode()
    forged = httpx.post(receiver.url + "/good", content=body_bytes,
                        headers=signed_headers("whsec_" + "Zm9yZ2VkLXNlY3JldC1ieXRlcy0xMjM0NTY3OA==", "x", body_bytes))
    assert forged.status_code == 401
    real = signed_headers(good["secret"], "whdel-x", body_bytes)
    assert httpx.post(receiver.url + "/good", content=body_bytes + b" ", headers=real).status_code == 401
    assert httpx.post(receiver.url + "/good", content=body_bytes, headers=real).status_code == 200


def test_worker_refuses_a_name_resolving_to_loopback_until_the_admin_allows_it(service, tmp_path):
    """A real worker: `localhost` passes registration where the API's admin allows that name, but a
    worker without the allowance resolves it, sees 127.0.0.1 and never connects (blocked_address,
    retried); a worker whose admin lists it delivers. The owner sees status codes and error
    classes, never the receiver's reply."""
    inside = Listener()  # an "internal" service a redirect points at
    listener = Listener(statuses={"/teapot": 418}, redirects={"/moved": f"{inside.url}/admin"})
    try:
        service.env.update({"SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS": "localhost",
                            "SDPO_WEBHOOK_RETRY_BASE_SECONDS": "0.3", "SDPO_WEBHOOK_RETRY_MAX_SECONDS": "0.6",
                            "SDPO_WEBHOOK_MAX_ATTEMPTS": "100", "SDPO_WEBHOOK_DISPATCH_SECONDS": "0.3"})
        service.start_api()
        client = service.client()
        hooks = {path: client.post(HOOKS, json={"url": f"http://localhost:{listener.port}{path}",
                                                "events": ["job.cancelled"]}).json()
                 for path in ("/ok", "/teapot", "/moved")}
        assert all(h.get("secret") for h in hooks.values()), hooks

        service.env["SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS"] = ""  # this worker's admin allows nothing
        blocked_worker = start_worker_with_beat(service, "blocked")
        train, _ = sample_files(tmp_path)
        body = {"model": "sdpo-tiny", "training_file": upload(client, train),
                "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}
        job = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel").json()["status"] == "cancelled"

        def deliveries(path):
            return client.get(f"{HOOKS}/{hooks[path]['id']}/deliveries").json()["data"]

        def blocked_twice():
            rows = [d for path in hooks for d in deliveries(path)]
            return rows if len(rows) == 3 and all(d["attempts"] >= 2 for d in rows) else None

        for row in _wait_for(blocked_twice, 60, "two refused attempts per delivery", service):
            assert (row["status"], row["last_status_code"], row["last_error"]) == ("pending", None, "blocked_address")
        assert listener.connections == 0  # refused before connecting, every time
        blocked_worker.terminate()
        blocked_worker.wait(timeout=30)

        service.env["SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS"] = "localhost"
        start_worker_with_beat(service, "allowed")
        ok = _wait_for(lambda: [d for d in deliveries("/ok") if d["status"] == "delivered"], 60, "the delivery",
                       service)
        assert ok[0]["last_status_code"] == 200 and ok[0]["last_error"] is None
        teapot = _wait_for(lambda: [d for d in deliveries("/teapot") if d["last_status_code"] == 418], 60,
                           "the 418 answer", service)
        assert teapot[0]["last_error"] == "http_4xx" and teapot[0]["status"] == "pending"
        moved = _wait_for(lambda: [d for d in deliveries("/moved") if d["last_status_code"] == 307], 60,
                          "the redirect answer", service)
        assert moved[0]["last_error"] == "http_3xx" and inside.connections == 0  # redirects are not followed
        posted = [r for r in listener.requests if r["path"] == "/ok"]
        assert posted and posted[0]["headers"]["host"] == f"localhost:{listener.port}"
        verify_signature(hooks["/ok"]["secret"], posted[0]["headers"], posted[0]["body"])
        # Nothing the owner can read carries the receiver's reply.
        seen = json.dumps([deliveries(p) for p in hooks]) + client.get(HOOKS).text
        assert Listener.SECRET_REPLY.decode() not in seen and "internal-reply" not in seen
    finally:
        listener.close()
        inside.close()


def test_deliveries_written_before_the_error_classes_show_only_a_class(api_client, db, user_key):
    """Rows from before the guard held up to 200 characters of the receiver's reply or the
    connection error; the API shows them as a class."""
    hook = api_client.post(HOOKS, headers=bearer(user_key), json={"url": "https://example.test/a"}).json()
    legacy = [("HTTP 500: <html>internal admin panel</html>", 500, "http_5xx"),
              ("ConnectError: [Errno 111] Connection refused to 10.0.0.5:5432", None, "network_error"),
              ("the webhook was deleted", None, "webhook_deleted"), ("timeout", None, "timeout"), (None, None, None)]
    for n, (text, code, _) in enumerate(legacy):
        db.add(WebhookDelivery(id=f"whdel-legacy{n}", webhook_id=hook["id"], owner="alice", event_type="job.failed",
                               payload={}, status="failed", attempts=8, last_status_code=code, last_error=text,
                               next_attempt_at=utcnow(), created_at=utcnow() - timedelta(seconds=n)))
    db.commit()
    rows = api_client.get(f"{HOOKS}/{hook['id']}/deliveries", headers=bearer(user_key)).json()["data"]
    assert [r["last_error"] for r in rows] == [expected for _, _, expected in legacy]
    assert "internal admin panel" not in json.dumps(rows) and "10.0.0.5" not in json.dumps(rows)
