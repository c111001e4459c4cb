"""The queue boundary: a created job is queued with T pending steps, and exactly one message (the
whole chain) reaches the broker, after the commit; when the transaction fails, none does."""

from __future__ import annotations

import base64
import json

from sqlalchemy import select

import core.jobs.lifecycle
from core.db import session_scope
from core.models import Event, Job, JobStep
from core.queue import enqueue_after_commit, job_chain, make_celery
from tests.conftest import bearer, preference_rows, queued_messages

JOBS = "/v1/fine_tuning/jobs"


def _chain_of(message: dict) -> tuple[str, list, list[tuple[str, list]]]:
    """(first task, its args, [(task, args) of the rest of the chain in execution order])."""
    args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    rest = [(sig["task"], sig["args"]) for sig in reversed(embed["chain"] or [])]
    return message["headers"]["task"], args, rest


def _sdpo_body(file_id: str, n_steps: int) -> dict:
    return {"model": "tiny-base", "training_file": file_id,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": n_steps}}}}


def test_created_job_is_queued_with_pending_steps_and_one_chained_message(
        client, upload, user_key, base_model, redis_client, settings, db):
    file_id = upload(user_key, preference_rows(12))["id"]
    response = client.post(JOBS, headers=bearer(user_key), json=_sdpo_body(file_id, 3))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued"
    steps = db.scalars(select(JobStep).where(JobStep.job_id == job["id"]).order_by(JobStep.index)).all()
    assert [(s.index, s.status) for s in steps] == [(1, "pending"), (2, "pending"), (3, "pending")]

    [message] = queued_messages(redis_client, settings.light_queue)
    assert redis_client.llen(settings.train_queue) == 0  # run_step is routed there when the chain gets to it
    task, args, rest = _chain_of(message)
    assert (task, args) == ("sdpo.prepare_job", [job["id"]])
    assert rest == [("sdpo.run_step", [job["id"], 1]), ("sdpo.run_step", [job["id"], 2]),
                    ("sdpo.run_step", [job["id"], 3]), ("sdpo.finalize_job", [job["id"]])]
    events = client.get(f"{JOBS}/{job['id']}/events", headers=bearer(user_key)).json()["data"]
    assert [e["message"].split(":")[0] for e in events] == [f"Created fine-tuning job {job['id']}"]


def test_failed_transaction_sends_nothing(client, upload, user_key, base_model, redis_client, settings, db,
                                          monkeypatch, count_rows):
    """The commit fails (a duplicate key, forced) after the chain was handed to enqueue_after_commit:
    the rollback drops it, so the broker never sees a job that does not exist."""
    file_id = upload(user_key, preference_rows(4))["id"]
    first = client.post(JOBS, headers=bearer(user_key), json=_sdpo_body(file_id, 2)).json()
    taken = db.scalars(select(Event.id).where(Event.job_id == first["id"])).first()
    redis_client.flushdb()
    before = count_rows()

    enqueued = []
    real_enqueue = core.jobs.lifecycle.enqueue_after_commit
    real_add_event = core.jobs.lifecycle.add_event

    def spy_enqueue(session, signature):
        enqueued.append(signature)
        real_enqueue(session, signature)

    def clashing_event(session, job_id, message, **kwargs):
        event = real_add_event(session, job_id, message, **kwargs)
        event.id = taken  # violates uq_events_id when the request commits
        return event

    monkeypatch.setattr(core.jobs.lifecycle, "enqueue_after_commit", spy_enqueue)
    monkeypatch.setattr(core.jobs.lifecycle, "add_event", clashing_event)
    response = client.post(JOBS, headers=bearer(user_key), json=_sdpo_body(file_id, 2))
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "uq_events_id" not in response.text  # no internals leak
    assert len(enqueued) == 1  # the chain was handed over before the commit failed ...
    assert redis_client.llen(settings.light_queue) == 0  # ... and never sent
    assert count_rows() == before


def test_enqueue_after_commit_sends_on_commit_and_drops_on_rollback(session_factory, settings, redis_client):
    app = make_celery(settings)
    with session_factory() as session:
        enqueue_after_commit(session, job_chain(app, "ftjob-rolled-back", [1]))
        session.rollback()
    with session_factory() as session:
        enqueue_after_commit(session, job_chain(app, "ftjob-never-committed", [1]))
        # closed without a commit
    assert redis_client.llen(settings.light_queue) == 0
    with session_scope(session_factory) as session:
        enqueue_after_commit(session, job_chain(app, "ftjob-committed", [1]))
        assert redis_client.llen(settings.light_queue) == 0  # not before the commit
    [message] = queued_messages(redis_client, settings.light_queue)
    assert _chain_of(message)[1] == ["ftjob-committed"]


def test_resume_sends_a_chain_of_the_remaining_steps(client, upload, user_key, base_model, redis_client,
                                                     settings, db):
    file_id = upload(user_key, preference_rows(6))["id"]
    job = client.post(JOBS, headers=bearer(user_key), json=_sdpo_body(file_id, 3)).json()
    assert client.post(f"{JOBS}/{job['id']}/pause", headers=bearer(user_key)).json()["status"] == "paused"
    # As if step 1 had finished before the pause.
    step1 = db.scalars(select(JobStep).where(JobStep.job_id == job["id"], JobStep.index == 1)).one()
    step1.status = "succeeded"
    db.commit()
    redis_client.flushdb()
    resumed = client.post(f"{JOBS}/{job['id']}/resume", headers=bearer(user_key)).json()
    assert resumed["status"] == "queued"
    [message] = queued_messages(redis_client, settings.light_queue)
    task, args, rest = _chain_of(message)
    assert task == "sdpo.prepare_job"
    assert [r[1][1] for r in rest if r[0] == "sdpo.run_step"] == [2, 3]
    assert db.get(Job, job["id"]).status == "queued"
