"""Step gates in core.jobs.lifecycle against real Postgres: a failed gate ends the job `succeeded` in
the step's own transaction (stop: the failing step's checkpoint; rollback: the best so far), cancels
the later steps, writes the outcome, its events and the job.succeeded outbox row once; a retried
commit answers ENDED_BY_GATE again and changes nothing; a job whose steps all pass records "passed"."""

from __future__ import annotations

from sqlalchemy import select

from core import ids
from core.jobs import get_steps, lifecycle
from core.models import Job, RegisteredModel
from core.models.webhook import Webhook, WebhookDelivery
from tests.worker.test_lifecycle import _claimed, _messages, _statuses, make_job  # noqa: F401 (fixture)


def _gated(db, job: Job, on_fail: str) -> Job:
    job.method = {"type": "sdpo", "sdpo": {"gate": {"metric": "eval.reward_margin", "min_delta": 0.0,
                                                    "on_fail": on_fail, "max_drift": None}}}
    db.commit()
    return job


def _succeed(db, job: Job, index: int, margin: float):
    claim = _claimed(db, job, index)
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    metrics = {"first_loss": 0.6931, "last_loss": 0.5, "mean_gamma_ref": 0.0, "num_tokens": 10,
               "eval": {"pairs": 4, "reward_margin": margin}, "drift": {"max_abs_per_token": 0.01}}
    kwargs = dict(checkpoint_id=checkpoint_id, uri=f"local://checkpoints/{job.id}/{checkpoint_id}", sha256="2" * 64,
                  size=10, metrics=metrics, event_id=ids.new_id(ids.EVENT))
    got = lifecycle.step_succeeded(db, job.id, index, claim.attempt, **kwargs)
    db.commit()
    return got, checkpoint_id, kwargs, claim.attempt


def test_stop_ends_the_job_at_the_failing_step_and_cancels_the_rest(db, make_job):  # noqa: F811
    job = _gated(db, make_job(n_steps=3, steps=("queued", "pending", "pending")), "stop")
    assert _succeed(db, job, 1, 0.3)[0] is True
    got, c2, kwargs, attempt = _succeed(db, job, 2, 0.1)
    assert got == lifecycle.ENDED_BY_GATE
    assert lifecycle.step_succeeded(db, job.id, 2, attempt, **kwargs) == lifecycle.ENDED_BY_GATE  # the retry
    db.commit()
    assert _statuses(db, job.id) == ("succeeded", ["succeeded", "succeeded", "cancelled"])
    job = db.get(Job, job.id)
    assert (job.gate["failed_step"], job.gate["result_step"], job.gate["result_checkpoint"]) == (2, 2, c2)
    assert job.gate["previous"]["value"] == 0.3 and job.gate["value"] == 0.1 and job.current_step == 2
    assert db.get(RegisteredModel, job.fine_tuned_model).checkpoint_id == c2
    messages = _messages(db, job.id)
    assert sum(m.startswith("Gate failed after step 2: eval.reward_margin 0.3000 (step 1) -> 0.1000") for m in messages) == 1
    assert messages[-1].startswith(f"Job succeeded: {job.fine_tuned_model}")
    assert lifecycle.finalize_job(db, job.id) is None  # a late finalize changes nothing


def test_rollback_registers_the_best_step_so_far_and_the_webhook_carries_the_gate(db, make_job):  # noqa: F811
    job = _gated(db, make_job(n_steps=3, steps=("queued", "pending", "pending")), "rollback")
    db.add(Webhook(id=ids.new_id("wh"), owner="alice", url="https://example.test/hook", secret="whsec_AAAA",
                   events=["job.succeeded"]))
    db.commit()
    _, _c1, _, _ = _succeed(db, job, 1, 0.3)
    _, c2, _, _ = _succeed(db, job, 2, 0.5)
    got, _c3, _, _ = _succeed(db, job, 3, 0.2)
    assert got == lifecycle.ENDED_BY_GATE
    job = db.get(Job, job.id)
    assert (job.status, job.gate["result_step"], job.gate["rolled_back"]) == ("succeeded", 2, True)
    assert db.get(RegisteredModel, job.fine_tuned_model).checkpoint_id == c2
    delivery = db.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)).one()
    assert delivery.payload["data"]["job"]["gate"]["result_checkpoint"] == c2


def test_a_job_whose_steps_all_pass_records_passed(db, make_job):  # noqa: F811
    job = _gated(db, make_job(n_steps=2, steps=("queued", "pending")), "stop")
    assert _succeed(db, job, 1, 0.1)[0] is True
    assert _succeed(db, job, 2, 0.2)[0] is True
    assert lifecycle.finalize_job(db, job.id) is not None
    db.commit()
    assert db.get(Job, job.id).gate["status"] == "passed"
    assert [st.status for st in get_steps(db, job.id)] == ["succeeded", "succeeded"]
