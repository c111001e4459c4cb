"""Uploads: streamed, hashed, validated line by line; an invalid upload stores nothing."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from core.models import File
from tests.conftest import FORMATS, bearer, jsonl_bytes, preference_rows, stored_objects


def _post_file(client, key, content: bytes, *, purpose="fine-tune", filename="pairs.jsonl", headers=None):
    return client.post("/v1/files", headers={**bearer(key), **(headers or {})}, data={"purpose": purpose},
                       files={"file": (filename, content, "application/jsonl")})


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_accepted_hashed_and_described(client, user_key, settings, db, fmt):
    content = jsonl_bytes(preference_rows(12, fmt=fmt))
    response = _post_file(client, user_key, content)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["status"] == "processed" and body["purpose"] == "fine-tune"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["format"] == fmt and body["rows"] == 12
    assert body["stats"]["sources"] == {"easy": 6, "hard": 6}
    row = db.get(File, body["id"])
    assert row.owner == "alice" and row.report["valid"] is True
    # Stored under our id, byte for byte.
    assert client.get(f"/v1/files/{body['id']}/content", headers=bearer(user_key)).content == content
    assert [p.name for p in stored_objects(settings)] == [body["id"]]


def test_bad_lines_are_each_reported_and_nothing_is_stored(client, user_key, settings, count_rows):
    good = preference_rows(3)
    lines = [
        json.dumps(good[0]),
        "this is not json",
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps(good[1]),
        json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"}),
        json.dumps({"prompt": "p", "chosen": "c"}),
    ]
    before = count_rows()
    response = _post_file(client, user_key, ("\n".join(lines) + "\n").encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_file" and error["param"] == "file" and error["type"] == "invalid_request_error"
    bad_lines = sorted({e["line"] for e in error["errors"]})
    assert bad_lines == [2, 3, 5, 6]
    assert error["error_count"] == len(error["errors"]) == 4
    assert all(set(e) == {"line", "field", "reason"} for e in error["errors"])
    by_line = {e["line"]: e for e in error["errors"]}
    assert by_line[5]["field"] == "chosen" and by_line[6]["field"] == "rejected"
    assert "4 problems" in error["message"]
    assert count_rows() == before
    assert stored_objects(settings) == []


def test_unsupported_purpose_is_refused_and_nothing_stored(client, user_key, settings, count_rows):
    before = count_rows()
    response = _post_file(client, user_key, jsonl_bytes(preference_rows(2)), purpose="assistants")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_purpose"
    assert count_rows() == before and stored_objects(settings) == []


def test_missing_file_part_and_wrong_content_type(client, user_key):
    response = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                           files={"other": ("x", b"1")})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_parameter"
    response = client.post("/v1/files", headers=bearer(user_key), json={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_content_type"


def test_upload_over_the_limit_is_413_by_header(make_client, user_key, settings, count_rows):
    small = make_client(max_upload_bytes=1000)
    before = count_rows()
    response = _post_file(small, user_key, jsonl_bytes(preference_rows(200)))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert count_rows() == before and stored_objects(settings) == []


def test_upload_over_the_row_limit_is_refused_and_nothing_stored(make_client, user_key, settings, count_rows):
    few = make_client(max_file_rows=5)
    before = count_rows()
    response = _post_file(few, user_key, jsonl_bytes(preference_rows(6)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_rows" and error["param"] == "file" and "SDPO_MAX_FILE_ROWS" in error["message"]
    assert count_rows() == before and stored_objects(settings) == []
    assert _post_file(few, user_key, jsonl_bytes(preference_rows(5))).status_code == 200


def test_upload_over_the_limit_is_stopped_mid_stream(make_live_server, user_key, settings, count_rows,
                                                     monkeypatch):
    """Without a Content-Length (chunked upload to a real server), the limit is enforced while
    streaming: the reader stops pulling the body at the limit instead of reading it to the end."""
    from api.files.multipart import MultipartUpload

    pulled = []
    real_file_chunks = MultipartUpload.file_chunks

    def counting(self, raw_chunks):
        for chunk in real_file_chunks(self, raw_chunks):
            pulled.append(len(chunk))
            yield chunk

    monkeypatch.setattr(MultipartUpload, "file_chunks", counting)
    url = make_live_server(max_upload_bytes=1000)
    boundary = "testboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    block = jsonl_bytes(preference_rows(100))
    n_blocks = 1000  # about 9 MB

    def body():
        yield head
        for _ in range(n_blocks):
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    before = count_rows()
    try:
        response = httpx.post(f"{url}/v1/files", content=body(), timeout=30, headers={
            **bearer(user_key), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    except httpx.TransportError:
        # The server answered 413 and closed the connection while this client was still
        # sending (what any HTTP server does to refuse an oversized body): also a refusal.
        response = None
    if response is not None:
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "file_too_large"
    assert count_rows() == before and stored_objects(settings) == []
    # It stopped within a network read or two of the limit, not at the end of the 9 MB body.
    assert 1000 < sum(pulled) < 512 * 1024 < n_blocks * len(block)


def test_list_retrieve_paginate_and_delete(client, user_key, upload, settings):
    ids = [upload(user_key, preference_rows(2, start=i))["id"] for i in range(3)]
    listed = client.get("/v1/files", headers=bearer(user_key)).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == ids[::-1]
    first = client.get("/v1/files", headers=bearer(user_key), params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[:0:-1] and first["has_more"] is True
    rest = client.get("/v1/files", headers=bearer(user_key), params={"limit": 2, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[:1] and rest["has_more"] is False
    ascending = client.get("/v1/files", headers=bearer(user_key), params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == ids

    assert client.get(f"/v1/files/{ids[0]}", headers=bearer(user_key)).json()["id"] == ids[0]
    deleted = client.delete(f"/v1/files/{ids[0]}", headers=bearer(user_key))
    assert deleted.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{ids[0]}", headers=bearer(user_key)).status_code == 404
    assert client.get(f"/v1/files/{ids[0]}/content", headers=bearer(user_key)).status_code == 404
    assert client.delete(f"/v1/files/{ids[0]}", headers=bearer(user_key)).status_code == 404
    assert ids[0] not in [f["id"] for f in client.get("/v1/files", headers=bearer(user_key)).json()["data"]]
    assert ids[0] not in {p.name for p in stored_objects(settings)}


def test_bad_list_parameters(client, user_key):
    for params, param in [({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "file-nope"}, "after")]:
        response = client.get("/v1/files", headers=bearer(user_key), params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] == param


def test_a_hostile_filename_is_metadata_only(client, user_key, settings):
    response = _post_file(client, user_key, jsonl_bytes(preference_rows(2)), filename="../../etc/passwd")
    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == "passwd"
    [stored] = stored_objects(settings)
    assert stored.name == body["id"] and stored.is_relative_to(settings.storage_dir)


def test_delete_is_refused_while_an_unfinished_job_uses_the_file(client, user_key, upload, base_model):
    file_id = upload(user_key)["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=bearer(user_key),
                      json={"model": "tiny-base", "training_file": file_id}).json()
    response = client.delete(f"/v1/files/{file_id}", headers=bearer(user_key))
    assert response.status_code == 409 and response.json()["error"]["code"] == "file_in_use"
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=bearer(user_key))
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(user_key)).status_code == 200
    # The finished job still names its file.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bearer(user_key)).json()["training_file"] == file_id


def test_idempotent_upload(client, user_key, settings, count_rows):
    content = jsonl_bytes(preference_rows(4))
    first = _post_file(client, user_key, content, headers={"Idempotency-Key": "up-1"})
    again = _post_file(client, user_key, content, headers={"Idempotency-Key": "up-1"})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert count_rows()["files"] == 1 and len(stored_objects(settings)) == 1
    other = _post_file(client, user_key, jsonl_bytes(preference_rows(5)), headers={"Idempotency-Key": "up-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count_rows()["files"] == 1 and len(stored_objects(settings)) == 1


# --------------------------------------------------------------------------------------------------
# Warnings, nothing dropped silently, and Parquet uploads (issue #13)


def _parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    buffer = io.BytesIO()
    pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in keys}), buffer)
    return buffer.getvalue()


def _smelly_rows() -> list[dict]:
    rows = preference_rows(24)
    rows[5] = dict(rows[4])  # an exact duplicate
    rows[2]["id"] = "ex-2"  # an ignored field
    for row in rows:  # chosen the longer answer in every pair
        row["chosen"] += " Explained step by step."
    return rows


def test_warnings_are_in_the_file_object_of_the_upload_and_later_reads(client, user_key):
    response = _post_file(client, user_key, jsonl_bytes(_smelly_rows()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file_type"] == "jsonl"
    assert [(w["code"], w["count"], w["lines"]) for w in body["warnings"]] == [
        ("ignored_fields", 1, [3]), ("duplicate_pairs", 1, [6]), ("length_bias", 24, list(range(1, 11)))]
    assert body["warnings"][0]["message"] == "1 pair: top-level fields not used for training were ignored: id (1 pair)"
    assert body["stats"]["length"]["chosen_longer_share"] == 1.0
    assert client.get(f"/v1/files/{body['id']}", headers=bearer(user_key)).json()["warnings"] == body["warnings"]
    listed = client.get("/v1/files", headers=bearer(user_key)).json()["data"]
    assert [f["warnings"] for f in listed if f["id"] == body["id"]] == [body["warnings"]]


def test_clean_file_has_an_empty_warnings_list(client, user_key):
    body = _post_file(client, user_key, jsonl_bytes(preference_rows(4))).json()
    assert body["warnings"] == []


def test_silently_dropped_content_is_refused_with_line_field_and_reason(client, user_key, settings, count_rows):
    good = {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
            "preferred_output": [{"role": "assistant", "content": "Paris."}],
            "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]}
    with_name = json.loads(json.dumps(good))
    with_name["input"]["messages"][0]["name"] = "alice"
    with_tools = json.loads(json.dumps(good))
    with_tools["input"]["tools"] = [{"type": "function", "function": {"name": "lookup"}}]
    image = json.loads(json.dumps(good))
    image["input"]["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    lines = [json.dumps(good), json.dumps(with_name), json.dumps(with_tools), json.dumps(image),
             json.dumps(good)[:-1] + ', "preferred_output": []}']
    before = count_rows()
    response = _post_file(client, user_key, ("\n".join(lines) + "\n").encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_file"
    assert [(e["line"], e["field"]) for e in error["errors"]] == [
        (2, "input.messages[0].name"), (3, "input.tools"), (4, "input.messages[0].content[0].type"),
        (5, "preferred_output"), (5, "preferred_output")]
    assert error["errors"][2]["reason"].startswith("content part type 'image_url' is not supported")
    # The repeated key, and what its last value (the one a JSON reader keeps) would have meant.
    assert error["errors"][3]["reason"].startswith("duplicate key 'preferred_output'")
    assert error["errors"][4]["reason"] == "expected exactly one assistant message, got 0 messages"
    assert count_rows() == before and stored_objects(settings) == []


def test_a_parquet_upload_is_described_like_the_same_pairs_in_jsonl(client, user_key, settings):
    rows = _smelly_rows()
    parquet = _parquet_bytes(rows)
    as_jsonl = _post_file(client, user_key, jsonl_bytes(rows)).json()
    response = _post_file(client, user_key, parquet, filename="train.parquet")
    assert response.status_code == 200, response.text
    as_parquet = response.json()
    assert (as_parquet["file_type"], as_parquet["format"], as_parquet["rows"]) == ("parquet", "standard", 24)
    same = ("format", "rows", "stats", "warnings", "status", "purpose")
    assert {k: as_parquet[k] for k in same} == {k: as_jsonl[k] for k in same}
    assert as_parquet["sha256"] == hashlib.sha256(parquet).hexdigest() and as_parquet["bytes"] == len(parquet)
    # Stored byte for byte, and the engine reads the stored object as Parquet.
    content = client.get(f"/v1/files/{as_parquet['id']}/content", headers=bearer(user_key)).content
    assert content == parquet
    from sdpo_engine.data import load_pairs

    stored = {p.name: p for p in stored_objects(settings)}
    assert load_pairs(stored[as_parquet["id"]]) == load_pairs(stored[as_jsonl["id"]])


def test_a_bad_parquet_upload_names_rows_and_stores_nothing(client, user_key, settings, count_rows):
    rows = preference_rows(4)
    rows[2]["rejected"] = rows[2]["chosen"]
    before = count_rows()
    response = _post_file(client, user_key, _parquet_bytes(rows), filename="bad.parquet")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_file"
    assert error["errors"] == [{"line": 3, "field": "rejected", "reason": "is the same text as chosen"}]
    assert count_rows() == before and stored_objects(settings) == []
    corrupt = _post_file(client, user_key, b"PAR1" + b"\x00" * 100 + b"PAR1", filename="x.parquet")
    assert corrupt.status_code == 400
    assert corrupt.json()["error"]["errors"][0]["reason"].startswith("not a readable Parquet file")


def test_the_row_cap_counts_parquet_rows_not_newline_bytes(make_client, user_key, settings, count_rows):
    few = make_client(max_file_rows=5)
    # Answers full of newlines: a line count of the bytes would see hundreds of "rows".
    rows = [{"prompt": f"Poem {i}?", "chosen": "line\n" * 100 + str(i), "rejected": "x\n" * 50 + str(i)}
            for i in range(6)]
    assert _post_file(few, user_key, _parquet_bytes(rows[:5]), filename="ok.parquet").status_code == 200
    before = count_rows()
    response = _post_file(few, user_key, _parquet_bytes(rows), filename="big.parquet")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_rows" and error["rows"] == 6 and error["max_rows"] == 5
    assert count_rows() == before


def test_the_shared_text_parts_case_uploads(client, user_key, settings):
    """../shared/cases/07 (OpenAI text content parts): accepted, and the stored file reads as the
    joined text."""
    from pathlib import Path

    from sdpo_engine.data import load_pairs

    case = Path(__file__).resolve().parents[2].parent / "shared" / "cases" / "07-openai-text-content-parts.jsonl"
    response = _post_file(client, user_key, case.read_bytes(), filename=case.name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["format"], body["rows"], body["warnings"]) == ("openai", 2, [])
    [stored] = stored_objects(settings)
    assert [p["prompt"][0]["content"] for p in load_pairs(stored)] == ["Name a planet.", "Name a fruit."]
