"""Response shapes are declared once, by the response models (api/*/schemas.py `from_row`): the
object a create returns (through api.idempotency.respond) is the object a lookup returns; a
step's metrics and a job's partition plan have a declared shape."""

from __future__ import annotations

import pytest

from core.models import Job, JobStep
from sdpo_engine.protocol import PartitionPlan
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"
STEP_METRIC_KEYS = ["first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy", "reward_margin", "eval",
                    "drift"]


@pytest.fixture
def training_file(upload, user_key, base_model) -> str:
    return upload(user_key, preference_rows(10))["id"]


def test_a_created_file_is_the_file_a_lookup_shows(client, user_key, upload):
    created = upload(user_key, preference_rows(4))
    assert client.get(f"/v1/files/{created['id']}", headers=bearer(user_key)).json() == created
    listed = client.get("/v1/files", headers=bearer(user_key)).json()
    assert listed["data"] == [created] and listed["first_id"] == listed["last_id"] == created["id"]


def test_a_created_webhook_is_the_webhook_a_lookup_shows_but_its_secret(client, user_key):
    created = client.post("/v1/webhooks", headers=bearer(user_key), json={"url": "https://example.test/h"}).json()
    assert created["secret"].startswith("whsec_")
    shown = client.get(f"/v1/webhooks/{created['id']}", headers=bearer(user_key)).json()
    assert shown == {**created, "secret": None}
    deleted = client.delete(f"/v1/webhooks/{created['id']}", headers=bearer(user_key)).json()
    assert deleted == {"id": created["id"], "object": "webhook", "deleted": True}


def test_a_registered_model_is_the_model_a_lookup_shows(client, admin_key, user_key, tmp_path):
    path = tmp_path / "models" / "shape-hf"
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    created = client.post("/v1/models", headers=bearer(admin_key), json={"id": "shape-hf", "path": str(path)}).json()
    assert client.get("/v1/models/shape-hf", headers=bearer(user_key)).json() == created


def test_created_and_cancelled_jobs_are_the_jobs_a_lookup_shows(client, user_key, training_file):
    created = client.post(JOBS, headers=bearer(user_key), json={"model": "tiny-base", "training_file": training_file})
    assert created.status_code == 200, created.text
    job = created.json()
    assert client.get(f"{JOBS}/{job['id']}", headers=bearer(user_key)).json() == job
    assert client.get(JOBS, headers=bearer(user_key)).json()["data"] == [job]
    cancelled = client.post(f"{JOBS}/{job['id']}/cancel", headers=bearer(user_key)).json()
    assert cancelled["status"] == "cancelled"
    assert client.get(f"{JOBS}/{job['id']}", headers=bearer(user_key)).json() == cancelled


def test_step_metrics_have_their_declared_keys_first_then_the_rest_as_recorded(client, db, user_key, training_file):
    job = client.post(JOBS, headers=bearer(user_key), json={"model": "tiny-base", "training_file": training_file}).json()
    step = client.get(f"{JOBS}/{job['id']}/steps", headers=bearer(user_key)).json()["data"][0]
    assert step["metrics"] == dict.fromkeys(STEP_METRIC_KEYS) and step["chunk"] is None

    row = db.query(JobStep).filter_by(job_id=job["id"], index=1).one()
    row.metrics = {"pairs": 10, "last_loss": 0.25, "first_loss": 0.6931, "train_seconds": 1.5,
                   "eval": {"pairs": 2, "reward_accuracy": 1.0}}
    row.chunk_stats = {"rows": 10, "sources": {"easy": 5, "hard": 5}}
    db.commit()
    step = client.get(f"{JOBS}/{job['id']}/steps", headers=bearer(user_key)).json()["data"][0]
    assert list(step["metrics"]) == [*STEP_METRIC_KEYS, "pairs", "train_seconds"]
    assert step["metrics"] == {"first_loss": 0.6931, "mean_gamma_ref": None, "last_loss": 0.25,
                               "reward_accuracy": None, "reward_margin": None,
                               "eval": {"pairs": 2, "reward_accuracy": 1.0}, "drift": None, "pairs": 10,
                               "train_seconds": 1.5}
    assert step["chunk"] == {"stats": {"rows": 10, "sources": {"easy": 5, "hard": 5}}, "rows": 10}


def test_the_openapi_schema_declares_step_metrics_and_chunks(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    step = schemas["StepObject"]["properties"]
    assert step["metrics"]["$ref"].endswith("/StepMetrics")
    metrics = schemas["StepMetrics"]
    assert list(metrics["properties"]) == STEP_METRIC_KEYS and metrics.get("additionalProperties") is True
    assert all(p.get("description") for p in metrics["properties"].values())
    assert "ChunkSummary" in str(step["chunk"])


def test_a_partition_plan_has_the_declared_keys(client, db, user_key, upload, base_model):
    file_id = upload(user_key, preference_rows(10))["id"]
    body = {"model": "tiny-base", "training_file": file_id,
            "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}
    job = client.post(JOBS, headers=bearer(user_key), json=body).json()
    plan = db.get(Job, job["id"]).partition
    # every required key, and only declared ones (rescore is declared NotRequired: pair_easy_to_hard only)
    assert PartitionPlan.__required_keys__ <= set(plan) <= set(PartitionPlan.__annotations__)
    assert plan == {"strategy": "random", "n_steps": 2, "source_field": "source", "sizes": None}
    assert job["method"]["sdpo"]["partition"] == plan
