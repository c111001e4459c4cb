"""The API on the S3 store (a real moto server over HTTP): uploads go to the bucket and are
validated by reading the object back as a stream, downloads stream from it, a refused upload
leaves nothing, and a store that is away is a 503 on /readyz and on upload with nothing registered."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import bearer, jsonl_bytes, preference_rows
from tests.s3server import MotoServer


@pytest.fixture
def s3_client(make_client, moto_server, monkeypatch, clean_state):
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = moto_server.new_bucket()
    client = make_client(storage_url=f"s3://{bucket}/sdpo")
    return client, bucket


def _objects(server: MotoServer, bucket: str) -> list[str]:
    raw = server.client()
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return keys + [f"(multipart) {u['Key']}" for u in raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _post(client, key, content: bytes, name="pairs.jsonl"):
    return client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                       files={"file": (name, content, "application/octet-stream")})


def test_an_upload_goes_to_the_bucket_and_downloads_from_it(s3_client, moto_server, user_key, settings):
    client, bucket = s3_client
    content = jsonl_bytes(preference_rows(40))
    response = _post(client, user_key, content)
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["bytes"] == len(content) and file["rows"] == 40
    assert _objects(moto_server, bucket) == [f"sdpo/files/{file['id']}"]
    assert not (settings.storage_dir / "files").exists()  # nothing on the API's disk
    got = client.get(f"/v1/files/{file['id']}/content", headers=bearer(user_key))
    assert got.status_code == 200 and got.content == content

    # Parquet: its footer is read by a ranged GET, rows batch by batch.
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(preference_rows(30)), buf)
    response = _post(client, user_key, buf.getvalue(), name="pairs.parquet")
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == 30 and response.json()["format"] == "standard"


def test_a_refused_upload_leaves_nothing_in_the_bucket(s3_client, moto_server, user_key, count_rows):
    client, bucket = s3_client
    response = _post(client, user_key, b'{"prompt": "x"}\n')
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_file"
    assert _objects(moto_server, bucket) == [] and count_rows()["files"] == 0


def test_a_store_that_is_away_is_503_on_readyz_and_upload(make_client, tmp_path, monkeypatch, user_key,
                                                          count_rows, clean_state):
    server = MotoServer(tmp_path).start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the standard variable: fewer retries, a quicker test
        bucket = server.new_bucket()
        client = make_client(storage_url=f"s3://{bucket}/sdpo")
        assert client.get("/readyz").json()["checks"]["storage"] == "ok"
        server.kill()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok"
        assert ready.json()["checks"]["database"] == "ok"
        response = _post(client, user_key, jsonl_bytes(preference_rows(5)))
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert count_rows()["files"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_file_of_several_megabytes_is_validated_while_it_streams(store, make_client, moto_server, monkeypatch,
                                                                    user_key, clean_state):
    """The validator reads the upload through a pipe as it streams (api/files/tee.py): every line
    of a file far past the pipe's first megabyte is read whole, and a bad one is named by its line."""
    if store == "s3":
        for name, value in moto_server.env().items():
            monkeypatch.setenv(name, value)
        client = make_client(storage_url=f"s3://{moto_server.new_bucket()}/sdpo")
    else:
        client = make_client()
    rows = preference_rows(20_000)
    content = jsonl_bytes(rows)
    assert len(content) > 2 << 20
    response = _post(client, user_key, content)
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == 20_000
    bad = content.replace(b'{"prompt": "What is 19000 + 19000?"', b'{"prompt": 7', 1)
    response = _post(client, user_key, bad)
    assert response.status_code == 400
    assert [e["line"] for e in response.json()["error"]["errors"]] == [19_001]
