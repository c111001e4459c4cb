"""Upload quotas: the row cap stops the stream; per-owner bytes, files and upload rate give 413/429
in the error envelope, before the body is read where they can, and hold under concurrent uploads."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from api.files import quotas
from api.files.multipart import MultipartUpload
from api.files.quotas import RowCounter
from core.db import make_engine, make_session_factory, session_scope
from core.keys import create_api_key
from core.migrate import upgrade_head
from sdpo_engine.data import validate_file
from tests.conftest import LiveServer, bearer, jsonl_bytes, preference_rows, stored_objects

BOUNDARY = "quotaboundary"


def _post_file(client, key, content: bytes):
    return client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                       files={"file": ("pairs.jsonl", content, "application/jsonl")})


def _chunked_upload(url: str, key: str, blocks, *, timeout: float = 60) -> httpx.Response | None:
    """POST a multipart upload without Content-Length (a chunked body made of `blocks`). None when
    the server closed the connection while the body was still being sent (a refusal too)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()

    def body():
        yield head
        yield from blocks
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    try:
        return httpx.post(f"{url}/v1/files", content=body(), timeout=timeout, headers={
            **bearer(key), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    except httpx.TransportError:
        return None


@pytest.fixture
def pulled(monkeypatch) -> list[int]:
    """Sizes of the file bytes the server pulled out of each request body (live servers only)."""
    sizes: list[int] = []
    real = MultipartUpload.file_chunks

    def counting(self, raw_chunks):
        for chunk in real(self, raw_chunks):
            sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(MultipartUpload, "file_chunks", counting)
    return sizes


def _assert_envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error"
    return error


# ------------------------------------------------------------------------------------------------
# The row cap


@pytest.mark.parametrize("seed", range(5))
def test_the_stream_row_count_matches_the_validator_at_any_chunking(tmp_path, seed):
    rng = random.Random(seed)
    lines = [b'{"prompt": "p", "chosen": "a", "rejected": "b"}', b"", b"   ", b"\t\r", b"x", b"  y  "]
    content = b"".join(rng.choice(lines) + rng.choice([b"\n", b"\r\n"]) for _ in range(300))
    content += rng.choice([b"", b"tail without newline", b"  "])
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    counter = RowCounter()
    at = 0
    while at < len(content):
        step = rng.randint(1, 40)
        counter.feed(content[at:at + step])
        at += step
    assert counter.seen == validate_file(path)["rows"]


def test_too_many_rows_names_the_first_line_past_the_cap(make_client, user_key, settings, count_rows):
    few = make_client(max_file_rows=5)
    before = count_rows()
    content = b"\n".join(jsonl_bytes(preference_rows(1, start=i)) for i in range(7))  # blank lines between
    error = _assert_envelope(_post_file(few, user_key, content), 400, "too_many_rows")
    assert error["param"] == "file" and error["max_rows"] == 5 and error["line"] == 11
    assert "SDPO_MAX_FILE_ROWS" in error["message"] and "Nothing was stored" in error["message"]
    assert count_rows() == before and stored_objects(settings) == []
    # Blank lines are not pairs: exactly the cap is accepted.
    assert _post_file(few, user_key, b"\n\n" + jsonl_bytes(preference_rows(5)) + b"\n  \n").status_code == 200


def test_the_row_cap_stops_reading_the_body(make_live_server, user_key, settings, count_rows, pulled):
    """A file of 200,000 pairs against a cap of 1,000: the server stops pulling the body just past
    row 1,001 (a few network reads), stores nothing, and answers 400 (or closes the connection)."""
    url = make_live_server(max_file_rows=1000)
    block = jsonl_bytes(preference_rows(1000))
    before = count_rows()
    response = _chunked_upload(url, user_key, (block for _ in range(200)))
    if response is not None:
        error = _assert_envelope(response, 400, "too_many_rows")
        assert error["line"] == 1001
    assert count_rows() == before and stored_objects(settings) == []
    assert len(block) < sum(pulled) < len(block) + 512 * 1024 < 200 * len(block)


# ------------------------------------------------------------------------------------------------
# Per-owner quotas


def test_too_many_files_is_429_until_one_is_deleted(make_client, user_key, other_key, settings, count_rows):
    client = make_client(max_files_per_owner=2)
    ids = [_post_file(client, user_key, jsonl_bytes(preference_rows(2, start=i))).json()["id"] for i in range(2)]
    before = count_rows()
    error = _assert_envelope(_post_file(client, user_key, jsonl_bytes(preference_rows(2))), 429, "too_many_files")
    assert error["files"] == 2 and error["limit"] == 2 and "SDPO_MAX_FILES_PER_OWNER" in error["message"]
    assert count_rows() == before and len(stored_objects(settings)) == 2
    # Per owner: another owner still uploads; deleting a file frees its slot.
    assert _post_file(client, other_key, jsonl_bytes(preference_rows(2))).status_code == 200
    assert client.delete(f"/v1/files/{ids[0]}", headers=bearer(user_key)).status_code == 200
    assert _post_file(client, user_key, jsonl_bytes(preference_rows(2))).status_code == 200


def test_storage_quota_is_413_and_counts_stored_bytes(make_client, user_key, other_key, settings, count_rows):
    first, second = jsonl_bytes(preference_rows(10)), jsonl_bytes(preference_rows(10, start=10))
    quota = len(first) + len(second) + 10
    client = make_client(max_storage_bytes_per_owner=quota)
    assert _post_file(client, user_key, first).status_code == 200
    # The second fits, a third would pass the quota: refused after its bytes passed what is left.
    assert _post_file(client, user_key, second).status_code == 200
    before = count_rows()
    error = _assert_envelope(_post_file(client, user_key, b"\n" * 20 + first), 413, "storage_quota_exceeded")
    assert error["param"] == "file" and error["quota_bytes"] == quota
    assert error["stored_bytes"] == len(first) + len(second)
    assert "SDPO_MAX_STORAGE_BYTES_PER_OWNER" in error["message"]
    assert count_rows() == before and len(stored_objects(settings)) == 2
    # Another owner has a quota of its own.
    assert _post_file(client, other_key, first).status_code == 200


def test_an_owner_at_the_quota_is_refused_before_the_body_is_read(make_live_server, user_key, settings, pulled,
                                                                  count_rows):
    content = jsonl_bytes(preference_rows(10))
    url = make_live_server(max_storage_bytes_per_owner=len(content))
    assert _chunked_upload(url, user_key, [content]).status_code == 200
    pulled.clear()
    before = count_rows()
    response = _chunked_upload(url, user_key, (content for _ in range(1000)))
    if response is not None:
        _assert_envelope(response, 413, "storage_quota_exceeded")
    assert pulled == [] and count_rows() == before and len(stored_objects(settings)) == 1


def test_the_storage_quota_stops_a_stream_that_passes_it(make_live_server, user_key, settings, pulled,
                                                         count_rows):
    url = make_live_server(max_storage_bytes_per_owner=4096)
    block = jsonl_bytes(preference_rows(100))
    before = count_rows()
    response = _chunked_upload(url, user_key, (block for _ in range(1000)))  # about 9 MB, no Content-Length
    if response is not None:
        _assert_envelope(response, 413, "storage_quota_exceeded")
    assert count_rows() == before and stored_objects(settings) == []
    assert 4096 < sum(pulled) < 512 * 1024


def test_upload_rate_is_429_with_retry_after(make_client, user_key, other_key, settings, count_rows):
    client = make_client(max_uploads_per_minute=3)
    for i in range(3):
        assert _post_file(client, user_key, jsonl_bytes(preference_rows(2, start=i))).status_code == 200
    before = count_rows()
    response = _post_file(client, user_key, jsonl_bytes(preference_rows(2)))
    error = _assert_envelope(response, 429, "upload_rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert error["retry_after_seconds"] == int(response.headers["Retry-After"])
    assert error["uploads_last_minute"] == 3 and "SDPO_MAX_UPLOADS_PER_MINUTE" in error["message"]
    assert count_rows() == before and len(stored_objects(settings)) == 3
    assert _post_file(client, other_key, jsonl_bytes(preference_rows(2))).status_code == 200


def test_a_replayed_upload_is_not_refused_by_the_limit_it_reached(make_client, user_key, settings):
    client = make_client(max_uploads_per_minute=1, max_files_per_owner=1)
    content = jsonl_bytes(preference_rows(2))
    first = client.post("/v1/files", headers={**bearer(user_key), "Idempotency-Key": "up-1"},
                        data={"purpose": "fine-tune"}, files={"file": ("p.jsonl", content)})
    assert first.status_code == 200
    again = client.post("/v1/files", headers={**bearer(user_key), "Idempotency-Key": "up-1"},
                        data={"purpose": "fine-tune"}, files={"file": ("p.jsonl", content)})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/files", headers={**bearer(user_key), "Idempotency-Key": "up-2"},
                        data={"purpose": "fine-tune"}, files={"file": ("p.jsonl", content)})
    _assert_envelope(other, 429, "upload_rate_limited")
    assert len(stored_objects(settings)) == 1


def test_zero_means_no_limit(make_client, user_key):
    client = make_client(max_files_per_owner=0, max_uploads_per_minute=0, max_storage_bytes_per_owner=0)
    for i in range(4):
        assert _post_file(client, user_key, jsonl_bytes(preference_rows(2, start=i))).status_code == 200


@pytest.fixture(params=["postgres", "sqlite"])
def files_limited_server(request, settings, tmp_path, user_key, make_live_server):
    """Factory: a live server with `overrides`, on the session's Postgres database or on a fresh
    SQLite file (the embedded mode); returns (url, a key of owner alice, the storage folder)."""
    servers: list[LiveServer] = []

    def start(**overrides) -> tuple[str, str, Path]:
        if request.param == "postgres":
            return make_live_server(**overrides), user_key, Path(settings.storage_dir)
        database_url = f"sqlite:///{tmp_path / 'sdpo.db'}"
        upgrade_head(database_url)
        with session_scope(make_session_factory(make_engine(database_url))) as s:
            key = create_api_key(s, name="alice", owner="alice")[1]
        storage_dir = tmp_path / "storage"
        server = LiveServer(settings.model_copy(update={"database_url": database_url, "storage_dir": storage_dir,
                                                        **overrides})).start()
        servers.append(server)
        return server.url, key, storage_dir

    yield start
    for server in servers:
        server.stop()


def test_concurrent_uploads_cannot_squeeze_past_the_files_limit(files_limited_server, monkeypatch):
    """Eight uploads all pass the check before their bodies (a barrier holds each one there until
    all eight did): the check in the inserting transaction, under the owner's lock (Postgres) or
    SQLite's one writer, still lets exactly three in."""
    n, limit = 8, 3
    barrier = threading.Barrier(n, timeout=30)
    real_admit = quotas.admit_upload

    def admit_then_wait(*args, **kwargs):
        allowance = real_admit(*args, **kwargs)
        barrier.wait()
        return allowance

    monkeypatch.setattr(quotas, "admit_upload", admit_then_wait)
    url, key, storage_dir = files_limited_server(max_files_per_owner=limit)

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                          files={"file": ("p.jsonl", jsonl_bytes(preference_rows(3, start=10 * i)))}, timeout=60)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * limit + [429] * (n - limit), [r.text for r in responses]
    assert all(r.json()["error"]["code"] == "too_many_files" for r in responses if r.status_code == 429)
    assert len([p for p in (storage_dir / "files").iterdir()]) == limit
