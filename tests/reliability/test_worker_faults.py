"""Workers and training processes that die, duplicate messages, cancel and pause in the middle of a
step, a checkpoint store that refuses the write, and retries that run out. Real processes: uvicorn,
Celery workers, TRL training on the tiny model, Postgres and Redis.

What is redone after a worker dies: at most the optimizer steps since the step's newest complete
trainer checkpoint (saved every `step_save_steps` steps, and on SIGTERM, which the training child
of a killed worker receives). The job's events still hold exactly one metrics event per optimizer
step: steps an earlier attempt recorded are not written again, and steps the dead worker could not
write any more are written from the checkpoint's trainer state.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis

from core.celery_config import RUN_STEP
from core.queue import job_chain, make_celery

from .conftest import (
    FaultyService,
    dpo_body,
    processes_gone,
    training_rows,
    upload_rows,
    wait_for,
    wait_status,
)

JOBS = "/v1/fine_tuning/jobs"
DONE = ("succeeded", "failed", "cancelled")


def _assert_one_metrics_event_per_optimizer_step(svc: FaultyService, job_id: str, index: int = 1) -> list[int]:
    steps = svc.metric_steps(job_id, index)
    events = [e for e in svc.events(job_id) if e["type"] == "metrics" and e["step"] == index]
    max_steps = events[-1]["data"]["max_steps"]
    assert sorted(steps) == list(range(1, max_steps + 1)), f"metrics events by global step: {sorted(steps)}"
    return steps


def _started_events(svc: FaultyService, job_id: str) -> list[dict]:
    return [e for e in svc.events(job_id) if "started (attempt" in e["message"]]


def _resume_events(svc: FaultyService, job_id: str) -> list[dict]:
    return [e for e in svc.events(job_id) if "redo_until" in e["data"]]


# ------------------------------------------------------------------------------------------------
# 1. A worker killed in the middle of a step


@pytest.mark.slow
def test_worker_host_killed_mid_step_another_worker_resumes_from_the_last_save(make_service, tmp_path):
    """SIGKILL the worker and its training child (the host is gone): the heartbeat goes stale, the
    reaper requeues the step, a second worker claims it as attempt 2 and resumes from the newest
    complete trainer checkpoint; the steps after that save are trained again, once."""
    svc = make_service()
    svc.start_api()
    w1 = svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))  # 24 pairs, batch 2, 2 epochs: 24 optimizer steps
    job = client.post(JOBS, json=dpo_body(file_id)).json()

    child, saved = svc.freeze_at_checkpoint(job["id"], at_least=4)
    trained_to = max([saved, *svc.metric_steps(job["id"])])
    killed = svc.kill_tree(w1, with_training=True)
    assert child.pid in killed
    wait_for(lambda: processes_gone(killed), 30, "the killed processes to be gone")

    svc.start_worker("w2", beat=True)  # the reaper runs in this one
    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "succeeded", svc.logs()

    [step] = svc.step_rows(job["id"])
    assert step["attempt"] == 2
    assert not any(step["worker"].endswith(f":{pid}") for pid in killed), "the dead worker cannot have finished it"
    assert len(svc.checkpoints(job["id"])) == 1
    lost = [e for e in svc.events(job["id"]) if e["data"].get("failed_attempt") == 1]
    assert len(lost) == 1 and "stopped answering" in lost[0]["message"], lost
    assert [e["data"]["attempt"] for e in _started_events(svc, job["id"])] == [1, 2]
    [resume] = _resume_events(svc, job["id"])
    assert resume["data"]["global_step"] == saved, (resume, saved)
    # What was trained twice: the steps between the save and the kill, fewer than save_steps (4).
    redone = resume["data"]["redo_until"] - saved
    assert 0 <= redone < 4 + 1 and resume["data"]["redo_until"] <= trained_to + 4
    _assert_one_metrics_event_per_optimizer_step(svc, job["id"])


@pytest.mark.slow
def test_worker_process_killed_its_training_child_saves_and_the_step_resumes_there(make_service, tmp_path):
    """SIGKILL only the Celery worker: its pool process dies with it, and the training child gets
    SIGTERM (PR_SET_PDEATHSIG), saves a trainer checkpoint where it is and exits. The next attempt
    resumes exactly there: nothing is trained twice, and the metrics the dead worker could not
    relay are written from the checkpoint."""
    svc = make_service()
    svc.start_api()
    w1 = svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))
    job = client.post(JOBS, json=dpo_body(file_id)).json()

    child, _ = svc.freeze_at_checkpoint(job["id"], at_least=4)
    svc.kill_tree(w1, with_training=False)
    child.send_signal(signal.SIGCONT)  # it finds the SIGTERM waiting, finishes its optimizer step, saves
    wait_for(lambda: not svc.training_processes(job["id"]), 120, "the orphaned training child to save and exit")
    saved = max(svc.trainer_checkpoints(job["id"]))

    svc.start_worker("w2", beat=True)
    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "succeeded", svc.logs()
    [step] = svc.step_rows(job["id"])
    assert step["attempt"] == 2
    [resume] = _resume_events(svc, job["id"])
    assert resume["data"]["global_step"] == saved
    assert resume["data"]["redo_until"] == saved, "a step saved on SIGTERM is not trained again"
    _assert_one_metrics_event_per_optimizer_step(svc, job["id"])
    assert any(e["data"].get("backfilled") for e in svc.events(job["id"]) if e["type"] == "metrics") or \
        resume["data"]["redo_until"] == saved


# ------------------------------------------------------------------------------------------------
# 2. Duplicate delivery


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_a_step_delivered_three_times_trains_once(make_service, tmp_path):
    """The job's chain is sent three times (as a redelivery would): three run_step(1) messages wait
    in the broker when two training workers start at once; one claim wins, the others exit."""
    svc = make_service()
    svc.start_api()
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(4))
    job = client.post(JOBS, json=dpo_body(file_id, n_epochs=1)).json()
    app = make_celery(svc.settings())
    for _ in range(2):
        job_chain(app, job["id"], [1]).apply_async()
    svc.start_worker("light", queues="light")  # runs the three prepare_job tasks
    queue = redis.Redis.from_url(svc.broker_url)
    wait_for(lambda: queue.llen(svc.train_queue) == 3, 120, "three run_step messages")
    t1 = svc.start_worker("t1", queues="train")
    t2 = svc.start_worker("t2", queues="train")
    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "succeeded", svc.logs()

    [step] = svc.step_rows(job["id"])
    assert step["attempt"] == 1
    assert len(_started_events(svc, job["id"])) == 1
    assert len(svc.checkpoints(job["id"])) == 1
    _assert_one_metrics_event_per_optimizer_step(svc, job["id"])
    wait_for(lambda: queue.llen(svc.train_queue) == 0, 60, "the duplicates to be consumed")
    logs = svc.logs()
    assert logs.count(RUN_STEP) >= 3 and t1.poll() is None and t2.poll() is None


# ------------------------------------------------------------------------------------------------
# 5. Cancel in the middle of a step


def test_cancel_mid_step_stops_the_child_and_registers_nothing(make_service, tmp_path):
    svc = make_service()
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))
    body = dpo_body(file_id)
    body["method"] = {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 2, "max_length": 64},
                                               "partition": {"strategy": "random", "n_steps": 2}}}
    job = client.post(JOBS, json=body).json()
    child, _ = svc.freeze_at_checkpoint(job["id"], at_least=4)
    child.send_signal(signal.SIGCONT)  # training on, mid-step

    asked = time.monotonic()
    assert client.post(f"{JOBS}/{job['id']}/cancel").json()["status"] == "cancelled"
    wait_for(lambda: processes_gone([child.pid]), 10, "the training process to stop")
    stopped_in = time.monotonic() - asked
    assert stopped_in < 10

    wait_for(lambda: any("stopped: the job was cancelled" in e["message"] for e in svc.events(job["id"])), 30,
             "the worker to record the stop")
    assert [s["status"] for s in svc.step_rows(job["id"])] == ["cancelled", "cancelled"]
    assert svc.checkpoints(job["id"]) == []
    assert client.get(f"{JOBS}/{job['id']}/checkpoints").json()["data"] == []
    storage = svc.home / "storage"
    assert not (storage / "checkpoints" / job["id"]).exists() or not any((storage / "checkpoints" / job["id"]).iterdir())
    assert not (storage / "work" / job["id"]).exists(), "the cancelled step's work folder is removed"
    assert client.get(f"{JOBS}/{job['id']}").json()["fine_tuned_model"] is None


# ------------------------------------------------------------------------------------------------
# 6. Pause and resume in the middle of a step


@pytest.mark.slow
def test_pause_mid_step_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(make_service, tmp_path):
    svc = make_service()
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))

    straight = client.post(JOBS, json=dpo_body(file_id, seed=5)).json()
    straight = wait_status(client, straight["id"], DONE)
    assert straight["status"] == "succeeded", svc.logs()

    job = client.post(JOBS, json=dpo_body(file_id, seed=5)).json()
    child, _ = svc.freeze_at_checkpoint(job["id"], at_least=4)
    assert client.post(f"{JOBS}/{job['id']}/pause").json()["status"] == "pausing"
    # The worker's SIGTERM waits on the frozen child: continued, it stops mid-step, not after its
    # last optimizer step (the tiny model runs the remaining steps faster than the worker's poll).
    svc.wait_signal_pending(child, signal.SIGTERM)
    child.send_signal(signal.SIGCONT)
    paused = wait_status(client, job["id"], ("paused",) + DONE, timeout=300)
    assert paused["status"] == "paused", svc.logs()
    [pause] = [e for e in svc.events(job["id"]) if "paused at global step" in e["message"]]
    at = pause["data"]["global_step"]
    assert at in svc.trainer_checkpoints(job["id"]), "the pause saved a trainer checkpoint where it stopped"
    assert svc.checkpoints(job["id"]) == []

    assert client.post(f"{JOBS}/{job['id']}/resume").json()["status"] == "queued"
    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "succeeded", svc.logs()
    [resume] = _resume_events(svc, job["id"])
    assert resume["data"]["global_step"] == at and resume["data"]["redo_until"] == at
    _assert_one_metrics_event_per_optimizer_step(svc, job["id"])
    a = client.get(f"{JOBS}/{straight['id']}/steps").json()["data"][0]["metrics"]
    b = client.get(f"{JOBS}/{job['id']}/steps").json()["data"][0]["metrics"]
    assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-3), (a, b)
    assert b["reward_accuracy"] == pytest.approx(a["reward_accuracy"], abs=0.05)


# ------------------------------------------------------------------------------------------------
# 7. The checkpoint store refuses the write


def test_checkpoint_write_failure_fails_the_job_and_leaves_nothing_half_written(make_service, tmp_path):
    svc = make_service()
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(4))
    body = dpo_body(file_id, n_epochs=1)
    body["method"] = {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 1},
                                               "partition": {"strategy": "random", "n_steps": 2}}}
    job = client.post(JOBS, json=body).json()
    # The store cannot take the checkpoint: where its folder must go, a file is in the way.
    store = svc.home / "storage"
    (store / "checkpoints").mkdir(parents=True, exist_ok=True)
    blocker = store / "checkpoints" / job["id"]
    blocker.write_text("not a folder")

    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "failed", svc.logs()
    assert done["error"]["code"] == "checkpoint_write_failed"
    assert "checkpoint store" in done["error"]["message"] and str(store) not in done["error"]["message"]
    steps = client.get(f"{JOBS}/{job['id']}/steps").json()["data"]
    assert [s["status"] for s in steps] == ["failed", "cancelled"]
    assert steps[0]["output_checkpoint"] is None and steps[1]["reference_checkpoint"] is None
    assert svc.checkpoints(job["id"]) == []
    assert blocker.read_text() == "not a folder"
    assert list((store / ".tmp").iterdir()) == [], "no half-copied checkpoint is left in the store's temp area"
    leftovers = [p for p in (store / "checkpoints").rglob("*") if p != blocker]
    assert leftovers == []
    assert not any("Step 2/2 started" in e["message"] for e in svc.events(job["id"]))


# ------------------------------------------------------------------------------------------------
# 8. Retries exhausted


def test_a_training_process_that_keeps_dying_fails_the_job_after_max_attempts(make_service, tmp_path):
    svc = make_service(env={"SDPO_MAX_STEP_ATTEMPTS": "2"})
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(4))
    job = client.post(JOBS, json=dpo_body(file_id, n_epochs=1)).json()
    killed: set[int] = set()
    started = time.monotonic()
    while time.monotonic() - started < 600:
        status = client.get(f"{JOBS}/{job['id']}").json()["status"]
        if status in DONE:
            break
        for child in svc.training_processes(job["id"]):  # the OOM killer, every time
            if child.pid not in killed:
                child.send_signal(signal.SIGKILL)
                killed.add(child.pid)
        time.sleep(0.05)
    done = client.get(f"{JOBS}/{job['id']}").json()
    assert done["status"] == "failed", svc.logs()
    assert len(killed) == 2
    assert done["error"]["code"] == "retries_exhausted"
    assert "after 2 attempts" in done["error"]["message"] and "SIGKILL" in done["error"]["message"]
    [step] = svc.step_rows(job["id"])
    assert step["status"] == "failed" and step["attempt"] == 2
    assert svc.checkpoints(job["id"]) == []


@pytest.mark.slow
def test_a_worker_that_keeps_dying_fails_the_job_after_max_attempts(make_service, tmp_path):
    svc = make_service(env={"SDPO_MAX_STEP_ATTEMPTS": "2"})
    svc.start_api()
    svc.start_worker("reaper", queues="light", beat=True)
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))
    job = client.post(JOBS, json=dpo_body(file_id)).json()
    for name in ("w1", "w2"):
        worker = svc.start_worker(name, queues="train")
        svc.freeze_at_checkpoint(job["id"], at_least=1 if name == "w1" else 5)
        svc.kill_tree(worker, with_training=True)
    done = wait_status(client, job["id"], DONE, timeout=300)
    assert done["status"] == "failed", svc.logs()
    assert done["error"]["code"] == "retries_exhausted"
    assert "after 2 attempts" in done["error"]["message"] and "stopped answering" in done["error"]["message"]
    [step] = svc.step_rows(job["id"])
    assert step["status"] == "failed" and step["attempt"] == 2
