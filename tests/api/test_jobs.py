"""Reading and steering jobs: list with cursor and metadata filter, retrieve, cancel, pause,
resume, events, checkpoints (with download), steps, and Idempotency-Key on POSTs."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from core.models import Job, JobStep
from core.storage import LocalStorage
from tests.api.factories import checkpoint_row
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def training_file(upload, user_key, base_model) -> str:
    return upload(user_key, preference_rows(10))["id"]


@pytest.fixture
def create(client, user_key, training_file):
    def make(n_steps: int = 1, **extra) -> dict:
        body = {"model": "tiny-base", "training_file": training_file, **extra}
        if n_steps > 1:
            body["method"] = {"type": "sdpo", "sdpo": {"partition": {"strategy": "random", "n_steps": n_steps}}}
        response = client.post(JOBS, headers=bearer(user_key), json=body)
        assert response.status_code == 200, response.text
        return response.json()

    return make


def _set_status(db, job_id: str, status: str, step_status: str | None = None) -> None:
    job = db.get(Job, job_id)
    job.status = status
    if step_status:
        for step in db.query(JobStep).filter_by(job_id=job_id):
            step.status = step_status
    db.commit()


def test_list_is_newest_first_with_cursor_and_has_more(client, user_key, create):
    ids = [create()["id"] for _ in range(5)]
    page1 = client.get(JOBS, headers=bearer(user_key), params={"limit": 2}).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2]
    page2 = client.get(JOBS, headers=bearer(user_key), params={"limit": 2, "after": page1["data"][-1]["id"]}).json()
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:4] and page2["has_more"] is True
    page3 = client.get(JOBS, headers=bearer(user_key), params={"limit": 2, "after": page2["data"][-1]["id"]}).json()
    assert [j["id"] for j in page3["data"]] == ids[:1] and page3["has_more"] is False
    default = client.get(JOBS, headers=bearer(user_key)).json()
    assert len(default["data"]) == 5 and default["has_more"] is False


def test_list_filters_by_metadata(client, user_key, create):
    a = create(metadata={"team": "a", "run": "1"})["id"]
    b = create(metadata={"team": "b"})["id"]
    create()
    only_a = client.get(JOBS, headers=bearer(user_key), params={"metadata[team]": "a"}).json()["data"]
    assert [j["id"] for j in only_a] == [a]
    both_keys = client.get(JOBS, headers=bearer(user_key), params={"metadata[team]": "a", "metadata[run]": "2"})
    assert both_keys.json()["data"] == []
    assert [j["id"] for j in client.get(JOBS, headers=bearer(user_key),
                                         params={"metadata[team]": "b"}).json()["data"]] == [b]


def test_bad_list_parameters(client, user_key):
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "many"}, {"after": "ftjob-unknown"}):
        response = client.get(JOBS, headers=bearer(user_key), params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] in ("limit", "after")


def test_retrieve_and_unknown_job(client, user_key, create):
    job = create()
    assert client.get(f"{JOBS}/{job['id']}", headers=bearer(user_key)).json() == job
    response = client.get(f"{JOBS}/ftjob-nope", headers=bearer(user_key))
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize("status", ["queued", "running", "pausing", "paused"])
def test_cancel_is_immediate_from_every_unfinished_state(client, user_key, create, db, status):
    job = create(n_steps=2)
    _set_status(db, job["id"], status)
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=bearer(user_key))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    steps = client.get(f"{JOBS}/{job['id']}/steps", headers=bearer(user_key)).json()["data"]
    assert {s["status"] for s in steps} == {"cancelled"}


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_of_a_finished_job_is_409(client, user_key, create, db, status):
    job = create()
    _set_status(db, job["id"], status)
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=bearer(user_key))
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_not_cancellable"


def test_pause_and_resume(client, user_key, create, db):
    queued = create(n_steps=2)
    paused = client.post(f"{JOBS}/{queued['id']}/pause", headers=bearer(user_key))
    assert paused.json()["status"] == "paused"
    again = client.post(f"{JOBS}/{queued['id']}/pause", headers=bearer(user_key))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_pausable"
    resumed = client.post(f"{JOBS}/{queued['id']}/resume", headers=bearer(user_key))
    assert resumed.json()["status"] == "queued"
    not_paused = client.post(f"{JOBS}/{queued['id']}/resume", headers=bearer(user_key))
    assert not_paused.status_code == 409 and not_paused.json()["error"]["code"] == "job_not_resumable"

    running = create()
    _set_status(db, running["id"], "running", step_status="running")
    pausing = client.post(f"{JOBS}/{running['id']}/pause", headers=bearer(user_key)).json()
    assert pausing["status"] == "pausing"  # the worker saves the trainer state and sets paused


def test_events_newest_first_with_cursor(client, user_key, create):
    job = create(n_steps=2)
    for action in ("pause", "resume", "cancel"):
        assert client.post(f"{JOBS}/{job['id']}/{action}", headers=bearer(user_key)).status_code == 200
    events = client.get(f"{JOBS}/{job['id']}/events", headers=bearer(user_key)).json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "Job cancelled." and messages[-1].startswith("Created fine-tuning job")
    assert len(messages) == 4 and events["has_more"] is False
    first = client.get(f"{JOBS}/{job['id']}/events", headers=bearer(user_key), params={"limit": 3}).json()
    assert first["has_more"] is True
    rest = client.get(f"{JOBS}/{job['id']}/events", headers=bearer(user_key),
                      params={"limit": 3, "after": first["data"][-1]["id"]}).json()
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in events["data"]]
    assert rest["has_more"] is False
    event = events["data"][0]
    assert event["object"] == "fine_tuning.job.event" and event["level"] == "info" and event["type"] == "message"


def test_checkpoints_list_and_tar_download(client, user_key, create, db, settings, tmp_path):
    job = create(n_steps=2)
    storage = LocalStorage(settings.storage_dir)
    trees = []
    for k in (1, 2):
        tree = tmp_path / f"step{k}"
        (tree / "sub").mkdir(parents=True)
        (tree / "config.json").write_text(json.dumps({"k": k}))
        (tree / "sub" / "weights.bin").write_bytes(bytes(range(256)) * (k * 700))
        trees.append(checkpoint_row(db, db.get(Job, job["id"]), k, storage=storage, tree=tree))
    listed = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=bearer(user_key)).json()
    assert [c["step_number"] for c in listed["data"]] == [2, 1] and listed["has_more"] is False
    ckpt = listed["data"][1]
    assert ckpt["object"] == "fine_tuning.job.checkpoint" and ckpt["fine_tuning_job_id"] == job["id"]
    assert ckpt["fine_tuned_model_checkpoint"].endswith(f":{job['id']}:ckpt-step-1")
    assert ckpt["metrics"]["train_loss"] == 0.5 and ckpt["step_index"] == 1
    page = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=bearer(user_key), params={"limit": 1}).json()
    assert page["has_more"] is True
    page2 = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=bearer(user_key),
                       params={"limit": 1, "after": page["data"][0]["id"]}).json()
    assert [c["id"] for c in page2["data"]] == [ckpt["id"]]

    response = client.get(f"{JOBS}/{job['id']}/checkpoints/{ckpt['id']}/content", headers=bearer(user_key))
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = sorted(tar.getnames())
        assert names == ["config.json", "sub", "sub/weights.bin"]
        assert tar.extractfile("sub/weights.bin").read() == bytes(range(256)) * 700
    missing = client.get(f"{JOBS}/{job['id']}/checkpoints/ftckpt-nope/content", headers=bearer(user_key))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"


def test_idempotent_create_and_cancel(client, user_key, training_file, count_rows, redis_client, settings):
    body = {"model": "tiny-base", "training_file": training_file, "seed": 3}
    headers = {**bearer(user_key), "Idempotency-Key": "create-1"}
    first = client.post(JOBS, headers=headers, json=body)
    replay = client.post(JOBS, headers=headers, json={"seed": 3, "training_file": training_file,
                                                      "model": "tiny-base"})  # same body, keys reordered
    assert first.status_code == replay.status_code == 200
    assert replay.json() == first.json() and replay.headers.get("idempotent-replayed") == "true"
    assert count_rows()["jobs"] == 1 and redis_client.llen(settings.light_queue) == 1
    other = client.post(JOBS, headers=headers, json={**body, "seed": 4})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count_rows()["jobs"] == 1 and redis_client.llen(settings.light_queue) == 1
    # The same key on another endpoint is another request.
    reused = client.post(f"{JOBS}/{first.json()['id']}/cancel", headers=headers)
    assert reused.status_code == 409

    job_id = first.json()["id"]
    cancel_headers = {**bearer(user_key), "Idempotency-Key": "cancel-1"}
    cancelled = client.post(f"{JOBS}/{job_id}/cancel", headers=cancel_headers)
    again = client.post(f"{JOBS}/{job_id}/cancel", headers=cancel_headers)
    assert cancelled.status_code == again.status_code == 200 and again.json() == cancelled.json()
    # Without the key a second cancel is a conflict.
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=bearer(user_key)).status_code == 409


def test_active_jobs_per_owner_limit(make_client, user_key, other_key, training_file, upload, db, count_rows):
    """SDPO_MAX_ACTIVE_JOBS_PER_OWNER: a create beyond it is 429 with nothing written; a finished
    job frees a place; another owner is not affected."""
    limited = make_client(max_active_jobs_per_owner=2)
    body = {"model": "tiny-base", "training_file": training_file}
    first, second = (limited.post(JOBS, headers=bearer(user_key), json=body) for _ in range(2))
    assert first.status_code == second.status_code == 200
    before = count_rows()
    refused = limited.post(JOBS, headers=bearer(user_key), json=body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_many_active_jobs" and "SDPO_MAX_ACTIVE_JOBS_PER_OWNER" in error["message"]
    assert count_rows() == before
    other_file = upload(other_key, preference_rows(10))["id"]
    assert limited.post(JOBS, headers=bearer(other_key),
                        json={**body, "training_file": other_file}).status_code == 200
    _set_status(db, first.json()["id"], "succeeded", "succeeded")
    assert limited.post(JOBS, headers=bearer(user_key), json=body).status_code == 200


def test_active_jobs_limit_holds_under_concurrent_creates(make_client, user_key, training_file):
    """The check is serialised per owner (a Postgres advisory lock): 6 creates at once against a
    limit of 3 give exactly 3 jobs."""
    from concurrent.futures import ThreadPoolExecutor

    limited = make_client(max_active_jobs_per_owner=3)
    body = {"model": "tiny-base", "training_file": training_file}
    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(lambda _: limited.post(JOBS, headers=bearer(user_key), json=body).status_code,
                                range(6)))
    assert codes == [200, 200, 200, 429, 429, 429]
    listed = limited.get(JOBS, headers=bearer(user_key), params={"limit": 100}).json()["data"]
    assert len(listed) == 3
