"""Every state change of core.jobs.lifecycle (the worker's: start, claim, succeeded, paused, attempt
failed, requeued, failed, finalised; the user's: create, cancel, pause, resume) against real
Postgres and Redis, one transition each: what the statuses, rows, events and broker messages are
after each, and that running one twice (a COMMIT whose answer was lost, then the retry) changes
nothing more."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from core import ids
from core.celery_config import JOB_ENDED
from core.clock import utcnow
from core.errors import Conflict
from core.jobs import get_steps, lifecycle
from core.models import Checkpoint, Event, Job, JobStep, RegisteredModel
from core.queue import make_celery
from tests.api.factories import checkpoint_row, file_row, job_row
from tests.conftest import queued_messages

METRICS = {"first_loss": 0.6931, "last_loss": 0.5, "mean_gamma_ref": -0.2, "num_tokens": 40}


@pytest.fixture
def app(settings):
    return make_celery(settings)


@pytest.fixture
def make_job(db, clean_state, base_model):
    def make(status: str = "running", n_steps: int = 2, steps: tuple[str, ...] = ()) -> Job:
        job = job_row(db, "alice", file_row(db, "alice").id, status=status, n_steps=n_steps)
        for step in get_steps(db, job.id):  # each step trains on the whole file, as in a job of given files
            step.training_file_id = job.training_file_id
        for step, step_status in zip(get_steps(db, job.id), steps, strict=False):
            step.status = step_status
        db.commit()
        return db.get(Job, job.id)
    return make


def _messages(db, job_id: str) -> list[str]:
    db.expire_all()
    return [e.message for e in db.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))]


def _statuses(db, job_id: str) -> tuple[str, list[str]]:
    db.expire_all()
    return db.get(Job, job_id).status, [st.status for st in get_steps(db, job_id)]


def _chains(redis_client, settings, job_id: str) -> list[list]:
    """The chains of `job_id` waiting in the broker, each as [(task, args), …] in execution order."""
    out = []
    for message in queued_messages(redis_client, settings.light_queue):
        args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
        rest = [(sig["task"], sig["args"]) for sig in reversed(embed["chain"] or [])]
        if args[:1] == [job_id]:
            out.append([(message["headers"]["task"], args), *rest])
    return out


def test_start_job_records_the_chunks_queues_step_1_and_logs_the_start_once(db, make_job):
    job = make_job(status="queued", n_steps=2)
    chunks = [(f"local://chunks/{job.id}/step-{k}.jsonl", {"rows": k}) for k in (1, 2)]
    plan = {"strategy": "random", "n_steps": 2}
    assert lifecycle.start_job(db, job.id, chunks, plan) is True
    db.commit()
    assert lifecycle.start_job(db, job.id, [], plan) is True  # a chain re-sent by the reaper
    db.commit()
    assert _statuses(db, job.id) == ("running", ["queued", "pending"])
    assert [st.chunk_uri for st in get_steps(db, job.id)] == [uri for uri, _ in chunks]
    assert _messages(db, job.id) == ["Job started: 2 step(s), partition random."]


def test_start_job_writes_each_warning_once_across_a_pause_and_resume(db, make_job, app):
    """A warning given with the job's start (the validation overlap) is one event per code: a chain re-sent
    by the reaper writes nothing, and neither does the start after a resume (the job went back to queued)."""
    job = make_job(status="queued", n_steps=2)
    overlap = ("Validation file file-v overlaps the training data (file-t): …", {"code": "validation_overlap"})
    other = ("Something else.", {"code": "another_warning"})
    assert lifecycle.start_job(db, job.id, [], {}, [overlap]) is True
    db.commit()
    assert lifecycle.start_job(db, job.id, [], {}, [overlap]) is True  # re-sent while running: no start at all
    db.commit()
    lifecycle.pause_job(db, db.get(Job, job.id))
    db.commit()
    if db.get(Job, job.id).status != "paused":  # pausing a running job waits for its step
        lifecycle.claim_step(db, job.id, 1, worker="w")
        db.commit()
    lifecycle.resume_job(db, db.get(Job, job.id), app)
    db.commit()
    assert db.get(Job, job.id).status == "queued"
    assert lifecycle.start_job(db, job.id, [], {}, [overlap, other]) is True
    db.commit()
    warned = [e for e in db.scalars(select(Event).where(Event.job_id == job.id, Event.level == "warn"))]
    assert sorted((e.data or {}).get("code") for e in warned) == ["another_warning", "validation_overlap"]


def test_start_job_of_a_cancelled_job_refuses(db, make_job):
    job = make_job(status="cancelled")
    assert lifecycle.start_job(db, job.id, [("local://chunks/x", {})], {}) is False
    db.commit()
    assert _messages(db, job.id) == []


def test_claim_step_claims_once_and_a_duplicate_delivery_gets_nothing(db, make_job):
    job = make_job(steps=("queued", "pending"))
    claim = lifecycle.claim_step(db, job.id, 1, "host:1")
    db.commit()
    assert isinstance(claim, lifecycle.StepClaim)
    assert (claim.attempt, claim.reference_id, claim.policy_init_uri, claim.recorded_global_step) == (1, None, None, 0)
    assert claim.base_model[:2] == ("local", "tiny-base")
    assert lifecycle.claim_step(db, job.id, 1, "host:2") is False  # the duplicate
    db.commit()
    assert _statuses(db, job.id) == ("running", ["running", "pending"])
    step = get_steps(db, job.id)[0]
    assert (step.attempt, step.worker, db.get(Job, job.id).current_step) == (1, "host:1", 1)
    assert _messages(db, job.id) == [
        "Step 1/2 started (attempt 1) on host:1; reference and initial policy: tiny-base."]


def test_claim_step_2_trains_on_step_1s_checkpoint_and_never_before_it_exists(db, make_job):
    job = make_job(steps=("running", "queued"))
    assert lifecycle.claim_step(db, job.id, 2, "host:1") is False  # step 1 has not succeeded
    ckpt = checkpoint_row(db, job, 1)
    step1 = get_steps(db, job.id)[0]
    step1.status, step1.output_checkpoint_id = "succeeded", ckpt.id
    db.commit()
    claim = lifecycle.claim_step(db, job.id, 2, "host:1")
    db.commit()
    assert (claim.reference_id, claim.policy_init_uri) == (ckpt.id, ckpt.uri)
    assert lifecycle.claim_step(db, job.id, 1, "host:1") is True  # a redelivered finished step: go on


def test_claim_step_of_a_pausing_job_pauses_it_between_steps(db, make_job):
    job = make_job(status="pausing", steps=("succeeded", "queued"))
    assert lifecycle.claim_step(db, job.id, 2, "host:1") is False
    db.commit()
    assert _statuses(db, job.id) == ("paused", ["succeeded", "queued"])
    assert _messages(db, job.id) == ["Job paused between steps."]


def _claimed(db, job: Job, index: int = 1) -> lifecycle.StepClaim:
    claim = lifecycle.claim_step(db, job.id, index, "host:1")
    db.commit()
    assert isinstance(claim, lifecycle.StepClaim)
    return claim


def test_step_succeeded_adds_the_checkpoint_queues_the_next_step_and_is_safe_to_repeat(db, make_job):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    kwargs = dict(checkpoint_id=checkpoint_id, uri=f"local://checkpoints/{job.id}/{checkpoint_id}", sha256="2" * 64,
                  size=10, metrics=METRICS, event_id=ids.new_id(ids.EVENT))
    assert lifecycle.step_succeeded(db, job.id, 1, claim.attempt, **kwargs) is True
    db.commit()
    assert lifecycle.step_succeeded(db, job.id, 1, claim.attempt, **kwargs) is True  # the retry
    db.commit()
    assert _statuses(db, job.id) == ("running", ["succeeded", "queued"])
    row = db.get(Checkpoint, checkpoint_id)
    assert (row.owner, row.step_index, row.bytes, row.metrics) == ("alice", 1, 10, METRICS)
    assert get_steps(db, job.id)[0].output_checkpoint_id == checkpoint_id
    assert _messages(db, job.id)[-1] == (f"Step 1 succeeded: checkpoint {checkpoint_id}, first loss 0.6931, "
                                         "last loss 0.5000, mean gamma_ref -0.2000.")


def test_step_succeeded_of_a_superseded_attempt_writes_nothing(db, make_job):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    assert lifecycle.step_succeeded(db, job.id, 1, claim.attempt + 1, checkpoint_id=checkpoint_id, uri="local://x",
                                    sha256="2" * 64, size=1, metrics=METRICS, event_id=ids.new_id(ids.EVENT)) is None
    db.commit()
    assert db.get(Checkpoint, checkpoint_id) is None
    assert _statuses(db, job.id) == ("running", ["running", "pending"])


def test_step_paused_pauses_a_pausing_job_and_requeues_the_step(db, make_job, app, redis_client, settings):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    db.get(Job, job.id).status = "pausing"
    db.commit()
    lifecycle.step_paused(db, app, job.id, claim.step_id, claim.attempt, {"global_step": 3},
                          event_id=ids.new_id(ids.EVENT))
    db.commit()
    assert _statuses(db, job.id) == ("paused", ["queued", "pending"])
    assert _messages(db, job.id)[-1] == "Step 1 paused at global step 3; it resumes from its trainer checkpoint."
    assert _chains(redis_client, settings, job.id) == []  # resume sends the chain, not the pause


def test_step_stopped_without_a_pause_is_sent_again(db, make_job, app, redis_client, settings):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    for _ in range(2):  # the second call is the retry of a commit whose answer was lost: no second chain
        lifecycle.step_paused(db, app, job.id, claim.step_id, claim.attempt, {"global_step": 3},
                              event_id=ids.new_id(ids.EVENT))
        db.commit()
    assert _statuses(db, job.id) == ("running", ["queued", "pending"])
    assert _messages(db, job.id)[-1] == ("Step 1 stopped at global step 3 without a pause request; requeued to "
                                         "resume from its trainer checkpoint.")
    assert _chains(redis_client, settings, job.id) == [[("sdpo.prepare_job", [job.id]), ("sdpo.run_step", [job.id, 1]),
                                                ("sdpo.run_step", [job.id, 2]), ("sdpo.finalize_job", [job.id])]]


def test_attempt_failed_requeues_and_ignores_an_attempt_that_is_no_longer_current(
        db, make_job, app, redis_client, settings):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    for _ in range(2):
        lifecycle.attempt_failed(db, app, job.id, 1, claim.attempt, "the training process failed (boom)",
                                 max_attempts=3)
        db.commit()
    step = get_steps(db, job.id)[0]
    assert (step.status, step.failed_attempts) == ("queued", 1)
    assert _messages(db, job.id)[-1] == ("Step 1: attempt 1 ended (the training process failed (boom)); requeued "
                                         "for attempt 2 of 3, resuming from its last trainer checkpoint.")
    assert len(_chains(redis_client, settings, job.id)) == 1


def test_requeue_stale_step_requeues_only_a_silent_step(db, make_job, app):
    job = make_job(steps=("queued", "pending"))
    _claimed(db, job)
    cutoff = utcnow() - timedelta(seconds=60)
    assert lifecycle.requeue_stale_step(db, app, job.id, cutoff, max_attempts=3) == 0  # it beat just now
    db.commit()
    get_steps(db, job.id)[0].heartbeat_at = utcnow() - timedelta(seconds=120)
    db.commit()
    assert lifecycle.requeue_stale_step(db, app, job.id, cutoff, max_attempts=3) == 1
    db.commit()
    assert _statuses(db, job.id) == ("running", ["queued", "pending"])
    assert "its worker host:1 stopped answering for 12" in _messages(db, job.id)[-1]


def test_resend_lost_chain_sends_the_remaining_steps_of_a_waiting_job(db, make_job, app, redis_client, settings):
    job = make_job(steps=("succeeded", "queued"))
    db.get(Job, job.id).updated_at = utcnow() - timedelta(seconds=120)
    db.commit()
    cutoff = utcnow() - timedelta(seconds=60)
    assert lifecycle.resend_lost_chain(db, app, job.id, cutoff) == 1
    db.commit()
    assert lifecycle.resend_lost_chain(db, app, job.id, cutoff) == 0  # it just changed: no longer waiting
    db.commit()
    assert _messages(db, job.id) == ["The broker had lost this job's message; sent again from step 2."]
    assert _chains(redis_client, settings, job.id) == [[("sdpo.prepare_job", [job.id]), ("sdpo.run_step", [job.id, 2]),
                                                ("sdpo.finalize_job", [job.id])]]


def test_fail_job_fails_the_running_step_and_cancels_the_rest(db, make_job):
    job = make_job(steps=("queued", "pending"))
    _claimed(db, job)
    lifecycle.fail_job(db, job.id, 1, "non_finite", "Step 1 failed: the loss is NaN")
    db.commit()
    lifecycle.fail_job(db, job.id, 1, "non_finite", "Step 1 failed: again")  # a finished job stays as it is
    db.commit()
    assert _statuses(db, job.id) == ("failed", ["failed", "cancelled"])
    job = db.get(Job, job.id)
    assert job.error == {"code": "non_finite", "message": "Step 1 failed: the loss is NaN", "param": None}
    assert get_steps(db, job.id)[0].error == {"code": "non_finite", "message": "Step 1 failed: the loss is NaN"}
    assert _messages(db, job.id)[-1] == "Step 1 failed: the loss is NaN"


def test_finalize_job_registers_the_last_checkpoint_as_a_model_once(db, make_job):
    job = make_job(steps=("succeeded", "succeeded"))
    for st in get_steps(db, job.id):
        st.output_checkpoint_id = checkpoint_row(db, job, st.index).id
        st.metrics = {"num_tokens": 10 * st.index}
    db.commit()
    name = lifecycle.finalize_job(db, job.id)
    db.commit()
    assert name == f"ft:tiny-base:alice::{job.id}"
    assert lifecycle.finalize_job(db, job.id) is None
    job = db.get(Job, job.id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens, job.current_step) == ("succeeded", name, 30, 2)
    model = db.get(RegisteredModel, name)
    assert (model.source, model.checkpoint_id) == ("checkpoint", get_steps(db, job.id)[1].output_checkpoint_id)
    assert _messages(db, job.id)[-1].startswith(f"Job succeeded: {name} (checkpoint ftckpt-")


def test_finalize_job_waits_for_every_step(db, make_job):
    job = make_job(steps=("succeeded", "running"))
    assert lifecycle.finalize_job(db, job.id) is None
    db.commit()
    assert _statuses(db, job.id) == ("running", ["succeeded", "running"])


# ------------------------------------------------------------------------------------------------
# The user's state changes (the API calls them inside its request's unit of work)


def test_create_job_queues_the_job_and_sends_its_chain_only_once_committed(db, clean_state, base_model, app,
                                                                            redis_client, settings):
    training = file_row(db, "alice")
    job = Job(id=ids.new_id(ids.JOB), owner="alice", model="tiny-base", model_id="tiny-base",
              training_file_id=training.id, method={"type": "sdpo"}, hyperparameters={}, n_steps=2,
              status="validating_files", seed=1)
    steps = [JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=k, status="pending", hyperparameters={})
             for k in (1, 2)]
    lifecycle.create_job(db, app, job, steps, origin="1 file", method_type="sdpo")
    assert _chains(redis_client, settings, job.id) == []  # nothing is sent before the commit
    db.commit()
    assert _statuses(db, job.id) == ("queued", ["pending", "pending"])
    assert _messages(db, job.id) == [f"Created fine-tuning job {job.id}: sdpo with 2 step(s) from 1 file."]
    assert _chains(redis_client, settings, job.id) == [[("sdpo.prepare_job", [job.id]), ("sdpo.run_step", [job.id, 1]),
                                                ("sdpo.run_step", [job.id, 2]), ("sdpo.finalize_job", [job.id])]]


def test_create_job_rolled_back_writes_and_sends_nothing(db, clean_state, base_model, app, redis_client, settings):
    training = file_row(db, "alice")
    job = Job(id=ids.new_id(ids.JOB), owner="alice", model="tiny-base", model_id="tiny-base",
              training_file_id=training.id, method={"type": "sdpo"}, hyperparameters={}, n_steps=1,
              status="validating_files", seed=1)
    step = JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=1, status="pending", hyperparameters={})
    lifecycle.create_job(db, app, job, [step], origin="1 file", method_type="sdpo")
    db.rollback()
    assert db.get(Job, job.id) is None and _messages(db, job.id) == []
    assert _chains(redis_client, settings, job.id) == []


def _tasks(redis_client, settings, job_id: str) -> list[str]:
    """The single tasks (no chain) waiting for `job_id` in the light queue, by name."""
    out = []
    for message in queued_messages(redis_client, settings.light_queue):
        args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
        if args[:1] == [job_id] and not embed["chain"]:
            out.append(message["headers"]["task"])
    return out


def test_cancel_job_cancels_the_job_and_its_unfinished_steps_once(db, make_job, app, redis_client, settings):
    job = make_job(steps=("succeeded", "running"))
    lifecycle.cancel_job(db, db.get(Job, job.id), app)
    db.commit()
    assert _statuses(db, job.id) == ("cancelled", ["succeeded", "cancelled"])
    assert _messages(db, job.id) == ["Job cancelled."]
    # Sent on every cancel: no worker may run a step to see it (stored trainer state, tracked runs).
    assert _tasks(redis_client, settings, job.id) == [JOB_ENDED]
    with pytest.raises(Conflict) as refused:
        lifecycle.cancel_job(db, db.get(Job, job.id), app)
    assert refused.value.code == "job_not_cancellable"
    db.rollback()
    assert _messages(db, job.id) == ["Job cancelled."]


def test_cancelling_a_paused_job_sends_job_ended_after_the_commit(db, make_job, app, redis_client, settings):
    job = make_job(status="paused", steps=("succeeded", "pending"))
    db.commit()
    lifecycle.cancel_job(db, db.get(Job, job.id), app)
    assert _tasks(redis_client, settings, job.id) == []  # nothing is sent before the commit
    db.commit()
    assert _tasks(redis_client, settings, job.id) == [JOB_ENDED]  # no worker runs a step to see it
    assert _statuses(db, job.id) == ("cancelled", ["succeeded", "cancelled"])


def test_pause_job_pauses_a_queued_job_at_once_and_asks_a_running_one(db, make_job):
    queued = make_job(status="queued", steps=("queued", "pending"))
    lifecycle.pause_job(db, db.get(Job, queued.id))
    db.commit()
    assert _statuses(db, queued.id) == ("paused", ["pending", "pending"])
    assert _messages(db, queued.id) == ["Job paused."]

    running = make_job(status="running", steps=("running", "pending"))
    lifecycle.pause_job(db, db.get(Job, running.id))
    db.commit()
    # the worker's step sees `pausing`, saves its trainer state and calls step_paused (above)
    assert _statuses(db, running.id) == ("pausing", ["running", "pending"])
    assert _messages(db, running.id) == ["Pause requested; the running step will save its state and stop."]

    for status in ("pausing", "paused"):
        with pytest.raises(Conflict) as refused:
            lifecycle.pause_job(db, db.get(Job, running.id if status == "pausing" else queued.id))
        assert refused.value.code == "job_not_pausable"
        db.rollback()


def test_resume_job_queues_a_paused_job_and_sends_the_remaining_steps(db, make_job, app, redis_client, settings):
    job = make_job(status="paused", steps=("succeeded", "pending"))
    lifecycle.resume_job(db, db.get(Job, job.id), app)
    db.commit()
    assert _statuses(db, job.id) == ("queued", ["succeeded", "pending"])
    assert _messages(db, job.id) == ["Job resumed; 1 step(s) to run."]
    assert _chains(redis_client, settings, job.id) == [[("sdpo.prepare_job", [job.id]), ("sdpo.run_step", [job.id, 2]),
                                                ("sdpo.finalize_job", [job.id])]]
    with pytest.raises(Conflict) as refused:  # queued now: only a paused job resumes
        lifecycle.resume_job(db, db.get(Job, job.id), app)
    assert refused.value.code == "job_not_resumable"
    db.rollback()
    assert len(_chains(redis_client, settings, job.id)) == 1


def test_attempt_failed_at_the_last_attempt_fails_the_step_and_the_job(db, make_job, app, redis_client, settings):
    job = make_job(steps=("queued", "pending"))
    claim = _claimed(db, job)
    lifecycle.attempt_failed(db, app, job.id, 1, claim.attempt, "the training process failed (boom)", max_attempts=1)
    db.commit()
    assert _statuses(db, job.id) == ("failed", ["failed", "cancelled"])
    assert db.get(Job, job.id).error["code"] == "retries_exhausted"
    assert _messages(db, job.id)[-1] == ("Step 1 failed after 1 attempt (max_step_attempts=1); the last one: "
                                         "the training process failed (boom).")
    assert _chains(redis_client, settings, job.id) == []


def test_step_stopped_by_cancel_only_tells_the_events(db, make_job):
    job = make_job(status="cancelled", steps=("cancelled", "cancelled"))
    lifecycle.step_stopped_by_cancel(db, job.id, 1)
    db.commit()
    assert _statuses(db, job.id) == ("cancelled", ["cancelled", "cancelled"])
    assert _messages(db, job.id) == ["Step 1 stopped: the job was cancelled."]
