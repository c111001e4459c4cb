"""A submitted job really trains: uvicorn, Celery worker processes, Postgres, Redis, TRL."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.models import JobStep

from .conftest import sample_files, sdpo_job, upload, wait_job

LN2 = math.log(2)


def _steps(client, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/steps").json()["data"]


def _all_events(client, job_id):
    events, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def test_two_step_sdpo_job_end_to_end(service, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    train, held = sample_files(tmp_path)
    r = client.post("/v1/fine_tuning/jobs", json=sdpo_job("sdpo-tiny", upload(client, train), upload(client, held)))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()

    s1, s2 = _steps(client, job["id"])
    assert (s1["status"], s2["status"]) == ("succeeded", "succeeded")
    assert s1["started_at"] <= s1["finished_at"] <= s2["started_at"], "steps did not run in order"
    assert s1["reference_checkpoint"] is None  # the base model
    assert s2["reference_checkpoint"] == s1["output_checkpoint"], "step 2's reference is not step 1's output"
    for s in (s1, s2):
        assert abs(s["metrics"]["first_loss"] - LN2) < 1e-3
        assert s["metrics"]["eval"]["pairs"] == 8

    events = _all_events(client, job["id"])
    metric_steps = Counter(e["data"]["step"] for e in events if e["type"] == "metrics")
    assert set(metric_steps) == {1, 2} and min(metric_steps.values()) >= 2

    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    final = [c for c in ckpts if c["id"] == s2["output_checkpoint"]][0]
    assert job["fine_tuned_model"].startswith("ft:sdpo-tiny:")
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models, "the final checkpoint was not registered as a model"

    # download as a tar stream and load it with transformers
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{final['id']}/content") as resp:
        assert resp.status_code == 200
        blob = b"".join(resp.iter_bytes())
    out = tmp_path / "downloaded"
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and len(tok) > 100
    manifest = json.loads((out / "sdpo_manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["checkpoint_sha256"] == final["sha256"]


def test_job_through_the_openai_sdk(service, tmp_path):
    import openai

    service.start_api()
    service.start_worker("w1")
    sdk = openai.OpenAI(base_url=service.url + "/v1", api_key=service.admin_key, max_retries=0)
    train, held = sample_files(tmp_path)
    with open(train, "rb") as fh:
        f_train = sdk.files.create(file=fh, purpose="fine-tune")
    with open(held, "rb") as fh:
        f_held = sdk.files.create(file=fh, purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="sdpo-tiny", training_file=f_train.id, validation_file=f_held.id, seed=0,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "beta": 0.1}}})
    assert job.status == "queued"
    client = service.client()
    wait_job(client, job.id)
    job = sdk.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", service.logs()
    assert job.fine_tuned_model
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=50)
    assert any("succeeded" in e.message for e in events.data)
    ckpts = sdk.fine_tuning.jobs.checkpoints.list(job.id)
    assert len(ckpts.data) == 1 and ckpts.data[0].fine_tuning_job_id == job.id


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_two_workers_three_jobs_hand_checkpoints_over_through_storage(service, tmp_path):
    service.start_api()
    service.start_worker("w1")
    service.start_worker("w2")
    client = service.client()
    train, _ = sample_files(tmp_path)
    file_id = upload(client, train)
    ids = []
    for seed in (1, 2, 3):
        body = sdpo_job("sdpo-tiny", file_id)
        body["seed"] = seed
        r = client.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    jobs = [wait_job(client, i, timeout=600) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, service.logs()
    for j in jobs:
        s1, s2 = _steps(client, j["id"])
        assert s2["reference_checkpoint"] == s1["output_checkpoint"]
    # which worker process (host:pid) claimed each step is recorded on the step row
    with session_scope(make_session_factory(make_engine(service.database_url))) as s:
        rows = s.execute(select(JobStep.job_id, JobStep.index, JobStep.worker)).all()
    per_job: dict[str, set[str]] = {}
    for job_id, _index, worker in rows:
        per_job.setdefault(job_id, set()).add(worker)
    assert len({w for ws in per_job.values() for w in ws}) == 2, "both workers should have trained"
    assert any(len(ws) == 2 for ws in per_job.values()), f"no job had its steps on two workers: {per_job}"


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_corrupt_checkpoint_fails_the_job_with_a_readable_error(service, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    train, _ = sample_files(tmp_path)
    file_id = upload(client, train)
    first = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}}).json()
    first = wait_job(client, first["id"])
    assert first["status"] == "succeeded", service.logs()
    ckpt = client.get(f"/v1/fine_tuning/jobs/{first['id']}/checkpoints").json()["data"][0]
    weights = next((service.home / "storage" / "checkpoints" / first["id"]).glob("*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\0" * 100  # damage the weights after they were stored
    weights.write_bytes(bytes(data))

    r = client.post("/v1/fine_tuning/jobs", json=sdpo_job(ckpt["id"], file_id))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "corrupt_checkpoint"
    assert "model.safetensors" in job["error"]["message"]
    s1, s2 = _steps(client, job["id"])
    assert (s1["status"], s2["status"]) == ("failed", "cancelled")
    assert all(s["status"] != "running" for s in (s1, s2))


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_plain_dpo_job_matches_the_engine_run(service, tmp_path, tiny_model_dir):
    """`{"type": "dpo"}` is one step, and trains exactly what `python -m sdpo_engine run` trains."""
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    train, _ = sample_files(tmp_path)
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "training_file": upload(client, train), "seed": 7,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.2}}}})
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()
    steps = _steps(client, job["id"])
    assert len(steps) == 1
    hp = steps[0]["hyperparameters"]

    out = tmp_path / "engine"
    cmd = [sys.executable, "-m", "sdpo_engine", "run", "--model", str(tiny_model_dir), "--step-file", str(train),
           "--out", str(out), "--beta", str(hp["beta"]), "--learning-rate", str(hp["learning_rate"]),
           "--epochs", str(hp["n_epochs"]), "--batch-size", str(hp["batch_size"]), "--max-length",
           str(hp["max_length"]), "--warmup-ratio", str(hp["warmup_ratio"]), "--seed", str(hp["seed"]),
           "--device", "cpu", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    engine = json.loads((out / "summary.json").read_text())["steps"][0]
    service_metrics = steps[0]["metrics"]
    for key in ("first_loss", "last_loss", "mean_gamma_ref", "reward_accuracy", "reward_margin"):
        assert abs(engine[key] - service_metrics[key]) < 1e-6, key
    ckpt = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    # same files, byte for byte (the manifest, which names paths, is not part of the digest)
    assert engine["output"]["sha256"] == ckpt["sha256"]
