"""End to end on the S3 store (a real moto server, its own process, over HTTP): API and workers
each with their own local folder, no shared volume; checkpoints handed over through the bucket."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import time

import pytest
from celery import Celery
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.models import Checkpoint, JobStep
from tests.s3server import MotoServer

from .conftest import sample_files, sdpo_job, upload, wait_job

INDEX = ".sdpo-tree.json"


def _use_s3(service, server: MotoServer) -> str:
    bucket = server.new_bucket()
    service.env.update(server.env())
    service.env["SDPO_STORAGE_URL"] = f"s3://{bucket}/sdpo"
    service.env["SDPO_STORAGE_DIR"] = str(service.home / "api-local")
    return bucket


def _start_worker(service, name: str):
    service.env["SDPO_STORAGE_DIR"] = str(service.home / f"{name}-local")  # each host its own folder
    return service.start_worker(name)


def _steps(client, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/steps").json()["data"]


def _events(client, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


def _wait(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(what)


def _rows(service, model, *where):
    with session_scope(make_session_factory(make_engine(service.database_url))) as s:
        return [tuple(r) for r in s.execute(select(*model).where(*where)).all()]


@pytest.mark.slow
def test_two_workers_without_a_shared_volume_hand_a_checkpoint_over_through_s3(service, tmp_path, moto_server):
    bucket = _use_s3(service, moto_server)
    service.start_api()
    _start_worker(service, "w1")
    client = service.client()
    train, _ = sample_files(tmp_path)
    file_id = upload(client, train)
    r = client.post("/v1/fine_tuning/jobs", json=sdpo_job("sdpo-tiny", file_id))
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    # Step 1 on w1; then w1 stops taking training work, so step 2 can only go to w2.
    _wait(lambda: _steps(client, job_id) and _steps(client, job_id)[0]["status"] in ("running", "succeeded"),
          120, "step 1 to start")
    app = Celery(broker=service.broker_url)
    replies = app.control.cancel_consumer(service.env["SDPO_TRAIN_QUEUE"],
                                          destination=[f"w1@{socket.gethostname()}"], reply=True, timeout=10)
    assert replies, "w1 did not answer the cancel_consumer request"
    _start_worker(service, "w2")
    job = wait_job(client, job_id, timeout=600)
    assert job["status"] == "succeeded", service.logs()

    s1, s2 = _steps(client, job_id)
    workers = _rows(service, (JobStep.index, JobStep.worker), JobStep.job_id == job_id)
    assert len({w for _, w in workers}) == 2, workers  # two processes (two "hosts": own folders)
    ckpts = {c["id"]: c for c in client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]}
    first, final = ckpts[s1["output_checkpoint"]], ckpts[s2["output_checkpoint"]]
    assert s2["reference_checkpoint"] == first["id"]
    # Lineage by sha256: step 2's policy/reference was step 1's checkpoint, byte for byte, as w2 downloaded it.
    cache_events = [e for e in _events(client, job_id) if e["message"].startswith("Checkpoint cache")]
    assert [e["message"].split(":")[0] for e in cache_events] == ["Checkpoint cache miss"], cache_events
    w2_trees = list((service.home / "w2-local" / "cache" / "trees").iterdir())
    assert len(w2_trees) == 2  # step 1's (downloaded) and step 2's own output (kept when uploaded)
    manifests = {json.loads((t / "sdpo_manifest.json").read_text())["checkpoint_sha256"]: t for t in w2_trees}
    assert set(manifests) == {first["sha256"], final["sha256"]}
    # No shared volume: the checkpoints are in the bucket only.
    for folder in ("api-local", "w1-local", "w2-local"):
        assert not (service.home / folder / "checkpoints").exists()
    keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"sdpo/checkpoints/{job_id}/{final['id']}/{INDEX}" in keys

    got = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{final['id']}/content")
    assert got.status_code == 200, got.text
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        manifest = json.loads(tar.extractfile("sdpo_manifest.json").read())
        assert "model.safetensors" in tar.getnames()
    assert manifest["checkpoint_sha256"] == final["sha256"]
    metrics = client.get("/metrics").text
    assert 'sdpo_checkpoint_cache_total{result="miss"} 1' in metrics

    # The fine-tuned model (an s3:// checkpoint) starts a new job: its worker reads it from the bucket.
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": job["fine_tuned_model"], "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}})
    assert r.status_code == 200, r.text
    follow_up = wait_job(client, r.json()["id"], timeout=300)
    assert follow_up["status"] == "succeeded", (follow_up.get("error"), service.logs())
    # Only w2 trains now, and it wrote that checkpoint: a cache hit, no download.
    cached = [e["message"] for e in _events(client, follow_up["id"]) if e["message"].startswith("Checkpoint cache")]
    assert len(cached) == 1 and cached[0].startswith("Checkpoint cache hit"), cached


@pytest.mark.slow
def test_the_store_killed_while_a_step_stores_its_checkpoint(service, tmp_path):
    """Step 1 stores its checkpoint; the store is killed while step 2 trains, so step 2's upload
    meets a dead store: botocore retries, then the step fails with checkpoint_write_failed and
    nothing is registered for it. The only checkpoint row is step 1's, whose object was complete."""
    server = MotoServer(tmp_path).start()
    try:
        bucket = _use_s3(service, server)
        service.start_api()
        _start_worker(service, "w1")
        client = service.client()
        train, _ = sample_files(tmp_path)
        # 3 epochs: step 2 trains for a few seconds, so the store dies during its training, not after its upload.
        r = client.post("/v1/fine_tuning/jobs", json=sdpo_job("sdpo-tiny", upload(client, train), n_epochs=3))
        job_id = r.json()["id"]
        # Step 2 on the same worker: its reference comes from the cache, no download.
        hit = _wait(lambda: [e for e in _events(client, job_id) if e["message"].startswith("Checkpoint cache")],
                    300, "step 2 to start")
        assert hit[0]["message"].startswith("Checkpoint cache hit"), hit
        # Its training data still comes from the store after that event: kill the store only once the
        # engine has started (its first event), or the step fails reading its data (storage_unavailable).
        _wait(lambda: [e for e in _events(client, job_id) if e["message"].startswith("Step 2: ")
                       and "pairs on" in e["message"]], 300, "step 2's engine to start")
        stored = [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket)["Contents"]
                  if o["Key"].startswith(f"sdpo/checkpoints/{job_id}/") and o["Key"].endswith(INDEX)]
        assert len(stored) == 1
        server.kill()
        job = wait_job(client, job_id, timeout=300)
        assert job["status"] == "failed", service.logs()
        assert job["error"]["code"] == "checkpoint_write_failed", job["error"]
        rows = _rows(service, (Checkpoint.id, Checkpoint.uri), Checkpoint.job_id == job_id)
        assert len(rows) == 1 and stored[0] == f"sdpo/checkpoints/{job_id}/{rows[0][0]}/{INDEX}"
        s1, s2 = _steps(client, job_id)
        assert (s1["status"], s2["status"]) == ("succeeded", "failed")
    finally:
        server.stop()


@pytest.mark.slow
def test_a_checkpoint_changed_in_the_bucket_fails_the_next_host_with_corrupt_checkpoint(service, tmp_path,
                                                                                        moto_server):
    """Another host downloads a checkpoint whose weights were changed in the bucket after they
    were stored: the sha256 check (when the job is prepared, or its first step starts) fails the
    job with corrupt_checkpoint, naming the file; nothing is trained or registered."""
    bucket = _use_s3(service, moto_server)
    service.start_api()
    _start_worker(service, "w1")
    client = service.client()
    train, _ = sample_files(tmp_path)
    file_id = upload(client, train)
    first = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}}).json()
    first = wait_job(client, first["id"])
    assert first["status"] == "succeeded", service.logs()
    ckpt = client.get(f"/v1/fine_tuning/jobs/{first['id']}/checkpoints").json()["data"][0]
    raw = moto_server.client()
    key = f"sdpo/checkpoints/{first['id']}/{ckpt['id']}/model.safetensors"
    data = bytearray(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-100:] = b"\0" * 100
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    # w1 holds the checkpoint in its cache: only w2 (an empty cache) may train the next job.
    app = Celery(broker=service.broker_url)
    assert app.control.cancel_consumer(service.env["SDPO_TRAIN_QUEUE"], destination=[f"w1@{socket.gethostname()}"],
                                       reply=True, timeout=10)
    _start_worker(service, "w2")
    r = client.post("/v1/fine_tuning/jobs", json=sdpo_job(ckpt["id"], file_id))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "failed", service.logs()
    assert job["error"]["code"] == "corrupt_checkpoint", job["error"]
    assert "model.safetensors" in job["error"]["message"]
    assert not list((service.home / "w2-local" / "cache" / "trees").glob("*"))
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
