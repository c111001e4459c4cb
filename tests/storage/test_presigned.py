"""`?presigned=true` on the download routes (api/presign.py): on the S3 store (a real moto server
over HTTP) the API answers with presigned GET URLs that plain urllib, with no credentials, can
fetch, and the bytes match the sha256 the API gives; on the local store the parameter is a 400
`presigned_unsupported` in the error envelope."""

from __future__ import annotations

import hashlib
import time
import urllib.request

import pytest

from core.s3_storage import S3Storage
from tests.api.factories import checkpoint_row, file_row, job_row
from tests.conftest import bearer, jsonl_bytes, preference_rows

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def s3_client(make_client, moto_server, monkeypatch, clean_state):
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{moto_server.new_bucket()}/sdpo"
    return make_client(storage_url=url), url


def _fetch(url: str) -> bytes:
    # No credentials, no boto3: what a client outside the deployment does with the URL.
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_a_presigned_file_url_fetches_the_uploaded_bytes(s3_client, user_key):
    client, _ = s3_client
    content = jsonl_bytes(preference_rows(25))
    file = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                       files={"file": ("pairs.jsonl", content, "application/octet-stream")}).json()
    before = int(time.time())
    response = client.get(f"/v1/files/{file['id']}/content", headers=bearer(user_key),
                          params={"presigned": "true", "expires_in": 600})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file.presigned" and body["bytes"] == len(content)
    assert before + 600 <= body["expires_at"] <= int(time.time()) + 600
    got = _fetch(body["url"])
    assert hashlib.sha256(got).hexdigest() == body["sha256"] == hashlib.sha256(content).hexdigest()
    # Without the parameter: the bytes, as before.
    assert client.get(f"/v1/files/{file['id']}/content", headers=bearer(user_key)).content == content
    # A lifetime out of range is refused in the envelope.
    short = client.get(f"/v1/files/{file['id']}/content", headers=bearer(user_key),
                       params={"presigned": "true", "expires_in": 5})
    assert short.status_code == 400 and short.json()["error"]["param"] == "expires_in", short.text


def test_presigned_checkpoint_urls_one_per_file_with_the_index_sha256(s3_client, user_key, db, base_model, tmp_path):
    client, url = s3_client
    store = S3Storage(url, tmp_path / "cache", max_attempts=2)
    tree = tmp_path / "step-1"
    (tree / "sub").mkdir(parents=True)
    files = {"config.json": b'{"k": 1}', "sub/weights.bin": bytes(range(256)) * 2000, "empty.txt": b""}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    job = job_row(db, "alice", file_row(db, "alice", rows=3).id, n_steps=1)
    ckpt = checkpoint_row(db, job, 1, storage=store, tree=tree)  # type: ignore[arg-type]

    response = client.get(f"{JOBS}/{job.id}/checkpoints/{ckpt.id}/content", headers=bearer(user_key),
                          params={"presigned": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "checkpoint.presigned" and body["expires_at"] >= int(time.time()) + 3500
    assert [f["path"] for f in body["files"]] == sorted(files)
    for entry in body["files"]:
        got = _fetch(entry["url"])
        assert got == files[entry["path"]] and entry["bytes"] == len(got)
        assert hashlib.sha256(got).hexdigest() == entry["sha256"]

    missing = client.get(f"{JOBS}/{job.id}/checkpoints/ftckpt-nope/content", headers=bearer(user_key),
                         params={"presigned": "true"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"


def test_the_local_store_refuses_presigned(clean_state, client, user_key, upload, db, base_model):
    file = upload(user_key, preference_rows(4))
    job = job_row(db, "alice", file["id"], n_steps=1)
    ckpt = checkpoint_row(db, job, 1)
    for path in (f"/v1/files/{file['id']}/content", f"{JOBS}/{job.id}/checkpoints/{ckpt.id}/content"):
        response = client.get(path, headers=bearer(user_key), params={"presigned": "true"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "presigned_unsupported" and error["param"] == "presigned"
        assert "SDPO_STORAGE_URL" in error["message"]
