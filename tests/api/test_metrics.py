"""Prometheus /metrics: the service's numbers from the database, in the text format, and nothing
that names an owner, a job or a key. JSON logs carry job ids and no secrets."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta

from core.clock import utcnow
from core.jobs import add_event
from core.logging import JsonFormatter, log_context, redact
from core.models import Job, JobStep
from tests.api.factories import file_row, job_row
from tests.conftest import bearer, preference_rows

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+|\+Inf)$")


def parse(text: str) -> dict[str, float]:
    """{'name{labels}': value} for every sample; asserts every line is valid exposition format."""
    out = {}
    for line in text.strip().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def test_metrics_from_the_database(client, db, upload, user_key, base_model):
    sizes = [upload(user_key, preference_rows(n))["bytes"] for n in (4, 8)]
    files = file_row(db, "bob", rows=3)
    now = utcnow()
    finished = job_row(db, "alice", files.id, status="succeeded", n_steps=2)
    for step, seconds in zip(db.query(JobStep).filter_by(job_id=finished.id).order_by(JobStep.index), (20, 400),
                             strict=True):
        step.status, step.started_at, step.finished_at = "succeeded", now - timedelta(seconds=seconds), now
    running = job_row(db, "bob", files.id, status="running", n_steps=2)
    first = db.query(JobStep).filter_by(job_id=running.id, index=1).one()
    first.status, first.started_at = "running", now
    running.current_step = 1
    waiting = job_row(db, "alice", files.id, status="running", n_steps=1)
    db.query(JobStep).filter_by(job_id=waiting.id).one().status = "queued"
    job_row(db, "alice", files.id, status="queued")
    add_event(db, running.id, "m", type="metrics", step_index=1, data={"step": 1, "tokens_per_second": 250.5})
    db.commit()

    client.get("/v1/files", headers=bearer(user_key))
    response = client.get("/metrics")  # public, like /healthz
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse(response.text)
    assert m['sdpo_jobs{status="succeeded"}'] == 1 and m['sdpo_jobs{status="running"}'] == 2
    assert m['sdpo_jobs{status="queued"}'] == 1 and m['sdpo_jobs{status="failed"}'] == 0
    assert m['sdpo_queue_depth{queue="jobs"}'] == 1 and m['sdpo_queue_depth{queue="steps"}'] == 1
    assert m['sdpo_job_steps{status="succeeded"}'] == 2 and m["sdpo_running_steps"] == 1
    assert m['sdpo_step_duration_seconds_bucket{le="30"}'] == 1
    assert m['sdpo_step_duration_seconds_bucket{le="600"}'] == 2
    assert m['sdpo_step_duration_seconds_bucket{le="+Inf"}'] == 2 and m["sdpo_step_duration_seconds_count"] == 2
    assert abs(m["sdpo_step_duration_seconds_sum"] - 420) < 1
    assert m["sdpo_tokens_per_second"] == 250.5
    assert m["sdpo_uploads_total"] == 3
    assert m["sdpo_upload_bytes_total"] == sum(sizes) + 1  # the factory's file row has 1 byte
    assert m['sdpo_http_requests_total{method="GET",route="/v1/files",status="200"}'] >= 1
    # Aggregates only: no owner, job id or key in the page.
    for secret in ("alice", "bob", running.id, user_key):
        assert secret not in response.text


def test_job_object_progress_and_queue_position(client, db, upload, user_key, base_model):
    file_id = upload(user_key, preference_rows(6))["id"]
    body = {"model": "tiny-base", "training_file": file_id,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}
    first = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json=body).json()
    second = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key), json=body).json()
    assert first["progress"]["queue_position"] == 1 and second["progress"]["queue_position"] == 2
    assert second["progress"] | {"queue_position": None} == {
        "step": 0, "n_steps": 2, "step_status": None, "global_step": None, "max_steps": None, "percent": 0.0,
        "tokens_per_second": None, "eta_seconds": None, "queue_position": None}

    # Step 1 done in 100 s; step 2 running, 10 of 40 optimizer steps, measured at 2 s per step.
    now = utcnow()
    job = db.get(Job, first["id"])
    job.status, job.current_step = "running", 2
    s1, s2 = db.query(JobStep).filter_by(job_id=job.id).order_by(JobStep.index).all()
    s1.status, s1.started_at, s1.finished_at = "succeeded", now - timedelta(seconds=200), now - timedelta(seconds=100)
    s2.status, s2.started_at = "running", now - timedelta(seconds=30)
    e1 = add_event(db, job.id, "m", type="metrics", step_index=2,
                   data={"step": 2, "global_step": 2, "max_steps": 40, "tokens_per_second": 90.0})
    e2 = add_event(db, job.id, "m", type="metrics", step_index=2,
                   data={"step": 2, "global_step": 10, "max_steps": 40, "tokens_per_second": 100.0})
    e1.created_at, e2.created_at = now - timedelta(seconds=16), now
    db.commit()

    got = client.get(f"/v1/fine_tuning/jobs/{job.id}", headers=bearer(user_key)).json()
    p = got["progress"]
    assert (p["step"], p["n_steps"], p["step_status"], p["global_step"], p["max_steps"]) == (2, 2, "running", 10, 40)
    assert p["percent"] == 62.5  # (1 finished + 10/40) of 2
    assert p["tokens_per_second"] == 100.0
    assert p["eta_seconds"] == 60  # 30 optimizer steps left at 2 s each; no later step
    assert got["estimated_finish"] is not None and got["estimated_finish"] >= got["created_at"]
    listed = client.get("/v1/fine_tuning/jobs", headers=bearer(user_key)).json()["data"]
    assert {j["id"]: j["progress"]["percent"] for j in listed}[job.id] == 62.5
    # The other job is now first in the queue.
    assert {j["id"]: j["progress"]["queue_position"] for j in listed}[second["id"]] == 1


def test_json_logs_carry_job_and_step_ids_and_no_secrets():
    record = logging.LogRecord("worker.flows", logging.INFO, __file__, 1,
                               "key sk-sdpo-abcDEF123_x and Bearer sk-sdpo-zzz and whsec_QUJDRA== and "
                               "postgresql+psycopg://u:hunter2@db/x", (), None)
    with log_context("ftjob-0123abcd", 2):
        line = json.loads(JsonFormatter().format(record))
    assert line["job_id"] == "ftjob-0123abcd" and line["step"] == 2 and line["level"] == "info"
    for secret in ("abcDEF123", "zzz", "QUJDRA", "hunter2"):
        assert secret not in line["message"]
    assert redact("Authorization: Bearer abc.def") == "Authorization: [redacted]"
    extra = logging.LogRecord("x", logging.WARNING, __file__, 1, "m", (), None)
    extra.job_id, extra.step, extra.api_key = "ftjob-1", 1, "sk-sdpo-secret"
    out = json.loads(JsonFormatter().format(extra))
    assert out["job_id"] == "ftjob-1" and out["step"] == 1 and "secret" not in out["api_key"]


def test_metrics_token_when_set(make_client, user_key):
    """SDPO_METRICS_TOKEN: without it /metrics is public (counts only); with it, only that bearer
    token reads it (an API key does not)."""
    token = "m" * 40
    guarded = make_client(metrics_token=token)
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=bearer(user_key)).status_code == 401
    refused = guarded.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
    ok = guarded.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and "sdpo_jobs" in ok.text
    assert make_client().get("/metrics").status_code == 200
