"""A step paused on one worker host resumes on another through the S3 store (a real moto server, its
own process, over HTTP): the hosts have their own local folders (no shared volume), so the trainer
checkpoint the pause saved can only reach the second host through the bucket (worker/trainer_state.py)."""

from __future__ import annotations

import signal

import pytest

from tests.reliability.conftest import (  # noqa: F401  (fixtures: the fault service with its hooks)
    make_service,
    tiny_model_dir,
    training_rows,
    upload_rows,
    wait_for,
    wait_status,
)

JOBS = "/v1/fine_tuning/jobs"
DONE = ("succeeded", "failed", "cancelled")


def _trainer_checkpoints(home, host: str, job_id: str, index: int = 1) -> list[int]:
    root = home / f"{host}-local" / "work" / job_id / f"step-{index}"
    return sorted(int(p.parent.name.rsplit("-", 1)[1])
                  for p in root.glob("attempt-*/trainer/checkpoint-*/trainer_state.json"))


def _on_s3(make, moto_server, local: str, env: dict | None = None):
    """A service whose store is a fresh moto bucket; its API's local folder is `local` (each worker
    later gets its own by setting SDPO_STORAGE_DIR before it starts). Returns (service, bucket)."""
    svc = make(env=env)
    bucket = moto_server.new_bucket()
    svc.env.update(moto_server.env())
    svc.env["SDPO_STORAGE_URL"] = f"s3://{bucket}/sdpo"
    svc.env["SDPO_STORAGE_DIR"] = str(svc.home / local)
    svc.start_api()
    return svc, bucket


def _bucket_keys(server, bucket: str) -> list[str]:
    return [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.slow
def test_a_step_paused_on_one_host_resumes_on_another_from_the_same_global_step(
        make_service, moto_server, tmp_path):  # noqa: F811 (make_service: the imported fixture)
    svc, bucket = _on_s3(make_service, moto_server, "api-local")
    svc.env["SDPO_STORAGE_DIR"] = str(svc.home / "w1-local")
    w1 = svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))  # 24 pairs: two chunks of 12
    body = {"model": "sdpo-tiny", "training_file": file_id, "seed": 3,
            "method": {"type": "sdpo", "sdpo": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 2, "max_length": 64},
                "partition": {"strategy": "random", "n_steps": 2}}}}
    r = client.post(JOBS, json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    # Freeze step 1's training process after a save (SDPO_STEP_SAVE_STEPS=4), ask for a pause: the
    # worker's SIGTERM is pending when the process goes on, so it stops mid-step and saves there.
    wait_for(lambda: any(n >= 4 for n in _trainer_checkpoints(svc.home, "w1", job_id)), 300,
             "a trainer checkpoint of step 1 on w1", interval=0.02)
    child = svc.wait_training(job_id)
    child.send_signal(signal.SIGSTOP)
    assert client.post(f"{JOBS}/{job_id}/pause").json()["status"] == "pausing"
    svc.wait_signal_pending(child, signal.SIGTERM)
    child.send_signal(signal.SIGCONT)
    paused = wait_status(client, job_id, ("paused",) + DONE, timeout=300)
    assert paused["status"] == "paused", svc.logs()
    [pause] = [e for e in svc.events(job_id) if "paused at global step" in e["message"]]
    at = pause["data"]["global_step"]
    assert at in _trainer_checkpoints(svc.home, "w1", job_id)
    # In the bucket before the pause was recorded: the record names a complete tree of that step.
    keys = _bucket_keys(moto_server, bucket)
    record_key = f"sdpo/jobs/{job_id}/steps/1/trainer-state.json"
    assert record_key in keys
    assert any(k.endswith(f"checkpoint-{at}/.sdpo-tree.json") for k in keys), keys

    # Host A goes away; host B (its own empty folder) takes the resumed step.
    w1.send_signal(signal.SIGTERM)
    w1.wait(60)
    svc.env["SDPO_STORAGE_DIR"] = str(svc.home / "w2-local")
    svc.start_worker("w2")
    assert client.post(f"{JOBS}/{job_id}/resume").json()["status"] == "queued"
    done = wait_status(client, job_id, DONE)
    assert done["status"] == "succeeded", svc.logs()

    events = svc.events(job_id)
    [fetched] = [e for e in events if e["data"].get("trainer_state") == "store"]
    assert fetched["step"] == 1 and fetched["data"]["global_step"] == at and fetched["data"]["attempt"] == 1
    assert not [e for e in events if e["data"].get("trainer_state") in ("unusable", "not_stored")]
    # The engine resumed there: the "resumes from" event names that global step, and every optimizer
    # step of step 1 has exactly one metrics event (none lost, none doubled across the hosts).
    [resume] = [e for e in events if "redo_until" in e["data"]]
    assert resume["step"] == 1 and resume["data"]["global_step"] == at, resume
    metrics = [e for e in events if e["type"] == "metrics" and e["step"] == 1]
    max_steps = metrics[-1]["data"]["max_steps"]
    assert sorted(e["data"]["global_step"] for e in metrics) == list(range(1, max_steps + 1))
    assert 0 < at < max_steps

    # Lineage: step 2's policy and reference is step 1's checkpoint (trained partly on each host).
    s1, s2 = svc.step_rows(job_id)
    assert s1["attempt"] == 2  # w1 (attempt 1) was gone: attempt 2 ran on w2
    steps = client.get(f"{JOBS}/{job_id}/steps").json()["data"]
    assert steps[1]["reference_checkpoint"] == steps[0]["output_checkpoint"] == s1["output"]
    ckpts = {c["id"]: c for c in client.get(f"{JOBS}/{job_id}/checkpoints").json()["data"]}
    assert set(ckpts) == {s1["output"], s2["output"]}
    got = client.get(f"{JOBS}/{job_id}/checkpoints/{s2['output']}/content")
    assert got.status_code == 200
    # The stored trainer state went with the job's end; no shared folder was ever used.
    assert not [k for k in _bucket_keys(moto_server, bucket) if k.startswith(f"sdpo/jobs/{job_id}/")]
    assert not (svc.home / "w2-local" / "work" / job_id).exists()
    assert not (svc.home / "storage").exists()


@pytest.mark.slow
def test_a_training_file_the_store_cannot_serve_fails_the_step_with_storage_unavailable(
        make_service, moto_server, tmp_path):  # noqa: F811 (make_service: the imported fixture)
    """The training worker cannot reach the store (its endpoint is down for it after boto3's
    retries): the step fails at once with `storage_unavailable`, not the generic retry path that
    would spend every attempt on the same outage and end in `retries_exhausted`."""
    from tests.s3server import free_port

    svc, bucket = _on_s3(make_service, moto_server, "api-local", env={"AWS_MAX_ATTEMPTS": "2"})
    svc.env["SDPO_STORAGE_DIR"] = str(svc.home / "light-local")
    svc.start_worker("light", queues="light")  # prepares the job: reads the file from the store
    svc.env["SDPO_STORAGE_DIR"] = str(svc.home / "train-local")
    svc.env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens: the store is away
    svc.start_worker("train", queues="train")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(4))
    r = client.post(JOBS, json={"model": "sdpo-tiny", "training_file": file_id,
                                "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}})
    assert r.status_code == 200, r.text
    done = wait_status(client, r.json()["id"], DONE, timeout=300)
    assert done["status"] == "failed", svc.logs()
    assert done["error"]["code"] == "storage_unavailable", done["error"]
    assert "training data" in done["error"]["message"] and str(svc.home) not in done["error"]["message"]
    [step] = svc.step_rows(done["id"])
    assert step["attempt"] == 1 and step["error"]["code"] == "storage_unavailable"
    events = svc.events(done["id"])
    assert not [e for e in events if "requeued" in e["message"]]
    # Its trainer state could not be looked up either: said, not raised.
    assert [e["data"]["reason"] for e in events if e["data"].get("trainer_state") == "unusable"] == [
        "the store could not be reached after retries"]


@pytest.mark.slow
def test_a_crash_after_a_save_stores_the_state_and_spent_retries_remove_it(
        make_service, moto_server, tmp_path):  # noqa: F811 (make_service: the imported fixture)
    """A training process killed after a save (the OOM killer): its save goes into the bucket for
    the next attempt on any host; when the last attempt dies too, the job fails with
    retries_exhausted and its stored trainer state is removed."""
    svc, bucket = _on_s3(make_service, moto_server, "w1-local", env={"SDPO_MAX_STEP_ATTEMPTS": "2"})
    svc.start_worker("w1")
    client = svc.client()
    file_id = upload_rows(client, tmp_path, training_rows(12))
    job_id = client.post(JOBS, json={"model": "sdpo-tiny", "training_file": file_id, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "max_length": 64}}}}).json()["id"]
    record_key = f"sdpo/jobs/{job_id}/steps/1/trainer-state.json"

    wait_for(lambda: any(n >= 4 for n in _trainer_checkpoints(svc.home, "w1", job_id)), 300,
             "a trainer checkpoint of step 1", interval=0.02)
    first = svc.wait_training(job_id)
    first.send_signal(signal.SIGKILL)
    wait_for(lambda: record_key in _bucket_keys(moto_server, bucket), 120, "the stored trainer state")
    stored = moto_server.client().get_object(Bucket=bucket, Key=record_key)["Body"].read()
    assert '"attempt": 1' in stored.decode() and '"global_step": ' in stored.decode()

    second = wait_for(lambda: [p for p in svc.training_processes(job_id) if p.pid != first.pid], 300,
                      "attempt 2's training process")[0]
    second.send_signal(signal.SIGKILL)
    done = wait_status(client, job_id, DONE, timeout=300)
    assert done["status"] == "failed" and done["error"]["code"] == "retries_exhausted", done
    assert not [k for k in _bucket_keys(moto_server, bucket) if k.startswith(f"sdpo/jobs/{job_id}/")]
