"""Owner isolation: a second owner can neither see nor act on the first owner's files, jobs,
models and checkpoints, on any endpoint; such objects answer exactly like unknown ones."""

from __future__ import annotations

import pytest

from core.models import Job
from core.storage import LocalStorage
from tests.api.factories import checkpoint_row, fine_tuned_model_row
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def alices(client, db, upload, user_key, base_model, settings, tmp_path) -> dict:
    file_id = upload(user_key, preference_rows(6))["id"]
    job = client.post(JOBS, headers=bearer(user_key), json={
        "model": "tiny-base", "training_file": file_id,
        "method": {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": 2}}}}).json()
    tree = tmp_path / "ckpt"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    row = db.get(Job, job["id"])
    checkpoint = checkpoint_row(db, row, 1, storage=LocalStorage(settings.storage_dir), tree=tree)
    model = fine_tuned_model_row(db, row, checkpoint)
    return {"file": file_id, "job": job["id"], "checkpoint": checkpoint.id, "model": model.id}


def _requests(a: dict) -> list[tuple[str, str, dict | None, str]]:
    """(method, path, json body, expected code) for every endpoint that takes an object id."""
    job = f"{JOBS}/{a['job']}"
    return [
        ("GET", f"/v1/files/{a['file']}", None, "file_not_found"),
        ("GET", f"/v1/files/{a['file']}/content", None, "file_not_found"),
        ("DELETE", f"/v1/files/{a['file']}", None, "file_not_found"),
        ("GET", f"/v1/models/{a['model']}", None, "model_not_found"),
        ("GET", job, None, "job_not_found"),
        ("POST", f"{job}/cancel", None, "job_not_found"),
        ("POST", f"{job}/pause", None, "job_not_found"),
        ("POST", f"{job}/resume", None, "job_not_found"),
        ("GET", f"{job}/events", None, "job_not_found"),
        ("GET", f"{job}/checkpoints", None, "job_not_found"),
        ("GET", f"{job}/checkpoints/{a['checkpoint']}/content", None, "job_not_found"),
        ("GET", f"{job}/steps", None, "job_not_found"),
    ]


def test_another_owner_gets_404_on_every_object_endpoint(client, alices, user_key, other_key, count_rows):
    before = count_rows()
    for method, path, body, code in _requests(alices):
        response = client.request(method, path, headers=bearer(other_key), json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == code, (method, path)
        # ... while the owner still can (GETs only: the POSTs would change the job).
        if method == "GET":
            assert client.get(path, headers=bearer(user_key)).status_code == 200, path
    assert count_rows() == before
    assert client.get(f"{JOBS}/{alices['job']}", headers=bearer(user_key)).json()["status"] == "queued"


def test_another_owner_sees_nothing_in_lists(client, alices, user_key, other_key):
    assert client.get("/v1/files", headers=bearer(other_key)).json()["data"] == []
    assert client.get(JOBS, headers=bearer(other_key)).json()["data"] == []
    assert alices["model"] not in [m["id"] for m in client.get("/v1/models", headers=bearer(other_key)).json()["data"]]
    assert alices["model"] in [m["id"] for m in client.get("/v1/models", headers=bearer(user_key)).json()["data"]]
    # System models are shared.
    assert "tiny-base" in [m["id"] for m in client.get("/v1/models", headers=bearer(other_key)).json()["data"]]
    # Cursors are owner-scoped too.
    response = client.get(JOBS, headers=bearer(other_key), params={"after": alices["job"]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor"
    response = client.get("/v1/files", headers=bearer(other_key), params={"after": alices["file"]})
    assert response.status_code == 400


def test_another_owner_cannot_train_on_the_first_owners_objects(client, alices, other_key, count_rows):
    before = count_rows()
    cases = [
        ({"model": "tiny-base", "training_file": alices["file"]}, "file_not_found"),
        ({"model": "tiny-base", "training_file": "file-x", "validation_file": alices["file"]}, "file_not_found"),
        ({"model": alices["checkpoint"], "training_file": alices["file"]}, "model_not_found"),
        ({"model": alices["model"], "training_file": alices["file"]}, "model_not_found"),
    ]
    for body, code in cases:
        response = client.post(JOBS, headers=bearer(other_key), json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == code, body
    assert count_rows() == before


def test_idempotency_keys_are_per_owner(client, upload, user_key, other_key, base_model):
    a_file = upload(user_key)["id"]
    b_file = upload(other_key)["id"]
    key = {"Idempotency-Key": "same-key"}
    a_job = client.post(JOBS, headers={**bearer(user_key), **key}, json={"model": "tiny-base", "training_file": a_file})
    b_job = client.post(JOBS, headers={**bearer(other_key), **key}, json={"model": "tiny-base", "training_file": b_file})
    assert a_job.status_code == b_job.status_code == 200
    assert a_job.json()["id"] != b_job.json()["id"]
    assert b_job.json()["organization_id"] == "bob"


def test_another_owners_ids_do_not_work_through_ones_own_job(client, alices, upload, other_key, base_model, db):
    """Bob names Alice's checkpoint, event or checkpoint cursor under his own job: nothing leaks."""
    from core.models import Event

    bobs_file = upload(other_key, preference_rows(4))["id"]
    bobs_job = client.post(JOBS, headers=bearer(other_key), json={"model": "tiny-base", "training_file": bobs_file})
    bob_job = f"{JOBS}/{bobs_job.json()['id']}"
    alices_event = db.query(Event).filter_by(job_id=alices["job"]).first().id
    response = client.get(f"{bob_job}/checkpoints/{alices['checkpoint']}/content", headers=bearer(other_key))
    assert response.status_code == 404 and response.json()["error"]["code"] == "checkpoint_not_found"
    response = client.get(f"{bob_job}/events", headers=bearer(other_key), params={"after": alices_event})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor"
    response = client.get(f"{bob_job}/checkpoints", headers=bearer(other_key), params={"after": alices["checkpoint"]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_cursor"
    # Alice's objects are named nowhere in what Bob can read.
    seen = " ".join(client.get(path, headers=bearer(other_key)).text for path in (
        "/v1/files", JOBS, "/v1/models", f"{bob_job}/events", f"{bob_job}/steps", f"{bob_job}/checkpoints"))
    for name in alices.values():
        assert name not in seen
