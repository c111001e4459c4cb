"""The broker, the database and the API restarted while jobs run: no job is lost, none trains a
step twice, and clients see consistent state. The broker and the database are servers of the test's
own (a redis-server and a Postgres cluster on free ports), so restarting them disturbs nobody else.
"""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import FaultyService, dpo_body, training_rows, upload_rows, wait_for, wait_status

JOBS = "/v1/fine_tuning/jobs"
DONE = ("succeeded", "failed", "cancelled")


def _one_metrics_event_per_step(svc: FaultyService, job_id: str) -> None:
    events = [e for e in svc.events(job_id) if e["type"] == "metrics"]
    by_step: dict[int, list[int]] = {}
    for e in events:
        by_step.setdefault(e["step"], []).append(e["data"]["global_step"])
    for index, steps in by_step.items():
        max_steps = max(e["data"]["max_steps"] for e in events if e["step"] == index)
        assert sorted(steps) == list(range(1, max_steps + 1)), (index, sorted(steps))


# ------------------------------------------------------------------------------------------------
# 3. The broker restarted and empty


@pytest.mark.slow
def test_broker_restarted_empty_queued_work_is_sent_again(make_service, private_redis, tmp_path):
    svc = make_service(broker_url=private_redis.url)
    svc.start_api()
    svc.start_worker("w1", beat=True)
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(8))
    running = client.post(JOBS, json=dpo_body(file_id, n_epochs=2)).json()
    waiting = client.post(JOBS, json=dpo_body(file_id, n_epochs=1, seed=3)).json()
    child, _ = svc.freeze_at_checkpoint(running["id"], at_least=4)
    assert client.get(f"{JOBS}/{waiting['id']}").json()["status"] in ("queued", "running")

    private_redis.stop()  # every message is gone: the waiting job's, and the running task's unacked one
    assert client.get("/readyz").json()["checks"]["broker"] != "ok"
    private_redis.start()
    child.send_signal(signal.SIGCONT)

    first = wait_status(client, running["id"], DONE)
    second = wait_status(client, waiting["id"], DONE)
    assert (first["status"], second["status"]) == ("succeeded", "succeeded"), svc.logs()
    resent = [e for e in svc.events(waiting["id"]) if "broker had lost" in e["message"]]
    assert len(resent) >= 1
    for job_id in (running["id"], waiting["id"]):
        assert [s["attempt"] for s in svc.step_rows(job_id)] == [1], "no step was trained twice"
        assert len(svc.checkpoints(job_id)) == 1
        _one_metrics_event_per_step(svc, job_id)
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------------------
# 4. The database restarted


@pytest.mark.slow
def test_database_restarted_mid_step_the_worker_retries_and_the_api_recovers(make_service, private_postgres,
                                                                              tmp_path):
    # A stale-step limit far above the outage: the outage alone must not requeue anything.
    svc = make_service(server_url=private_postgres.server_url, env={"SDPO_STEP_STALE_SECONDS": "600"})
    svc.start_api()
    svc.start_worker("w1", beat=True)
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))
    job = client.post(JOBS, json=dpo_body(file_id)).json()
    child, _ = svc.freeze_at_checkpoint(job["id"], at_least=4)

    private_postgres.stop("fast")  # every connection is cut, as in a restart
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        during = client.get(f"{JOBS}/{job['id']}")
        assert during.status_code == 503 and during.json()["error"]["code"] == "database_unavailable"
        # Training goes on while the database is away: heartbeats and events wait, nothing is killed.
        child.send_signal(signal.SIGCONT)
        wait_for(lambda: not svc.training_processes(job["id"]), 300, "the step to finish training")
        time.sleep(2)  # the worker now retries its final writes
    finally:
        private_postgres.start()

    wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the API to be ready again")
    done = wait_status(client, job["id"], DONE)
    assert done["status"] == "succeeded", svc.logs()
    [step] = svc.step_rows(job["id"])
    assert step["attempt"] == 1 and step["output"]
    assert len(svc.checkpoints(job["id"])) == 1
    _one_metrics_event_per_step(svc, job["id"])
    worker_log = (svc.home / "worker-w1.log").read_text()
    assert "relaying the last events failed" in worker_log or "database unavailable during record" in worker_log, \
        "the writes after training were retried"


# ------------------------------------------------------------------------------------------------
# 9. The API restarted while jobs run


@pytest.mark.slow
def test_api_restarted_while_jobs_run_loses_nothing(make_service, tmp_path):
    svc = make_service()
    svc.start_api()
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(6))
    body = dpo_body(file_id, n_epochs=2)
    body["method"] = {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 2},
                                               "partition": {"strategy": "random", "n_steps": 2}}}
    first = client.post(JOBS, json=body, headers={"Idempotency-Key": "run-1"}).json()
    second = client.post(JOBS, json={**body, "seed": 9}).json()
    svc.wait_training(first["id"])
    seen = client.get(f"{JOBS}/{first['id']}/events", params={"limit": 100}).json()["data"]

    svc.restart_api()  # SIGKILL, then a new process on the same port

    again = client.post(JOBS, json=body, headers={"Idempotency-Key": "run-1"})
    assert again.status_code == 200 and again.json()["id"] == first["id"], "the retried create is the same job"
    assert again.headers.get("idempotent-replayed") == "true"
    listed = client.get(JOBS, params={"limit": 100}).json()["data"]
    assert sorted(j["id"] for j in listed) == sorted([first["id"], second["id"]])
    for job_id in (first["id"], second["id"]):
        done = wait_status(client, job_id, DONE)
        assert done["status"] == "succeeded", svc.logs()
        steps = client.get(f"{JOBS}/{job_id}/steps").json()["data"]
        assert [s["status"] for s in steps] == ["succeeded", "succeeded"]
        assert steps[1]["reference_checkpoint"] == steps[0]["output_checkpoint"]
        assert [s["attempt"] for s in svc.step_rows(job_id)] == [1, 1]
    # Events read before the restart are a prefix of the log read after it (newest first).
    after = []
    cursor = None
    while True:
        page = client.get(f"{JOBS}/{first['id']}/events",
                          params={"limit": 100, **({"after": cursor} if cursor else {})}).json()
        after += page["data"]
        if not page["has_more"]:
            break
        cursor = page["data"][-1]["id"]
    ids_after = [e["id"] for e in after]
    assert len(ids_after) == len(set(ids_after))
    assert len(seen) < 100, "read the whole log before the restart"
    assert [e["id"] for e in seen] == ids_after[len(ids_after) - len(seen):]
