"""Bad input, table-driven: every case gets the right 4xx and error code, and leaves the database,
the store and the broker exactly as they were (no 500, nothing half-written, no task sent).

Uploads and JSON bodies are covered here; the job-spec semantics (hyperparameter ranges, steps,
partitions, metadata) have their own table in test_job_specs.py. A few inputs that look hostile
are valid (CRLF line ends, a filename with `../`): those cases expect 200 and check what was
stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.api.factories import file_row
from tests.conftest import bearer, jsonl_bytes, preference_rows, stored_objects

JOBS = "/v1/fine_tuning/jobs"
GOOD_ROW = {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}
LINE = json.dumps(GOOD_ROW).encode()
LIMITS = {"max_upload_bytes": 32768, "max_line_bytes": 8192}  # the app of this module, to test the limits


@dataclass
class Upload:
    """A multipart upload (or a raw body with `raw`)."""

    content: bytes = LINE + b"\n"
    purpose: str | None = "fine-tune"
    filename: str = "pairs.jsonl"
    extra_fields: dict = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Body:
    """A POST to the jobs endpoint: `json` (built from the context) or `raw` bytes."""

    json: Callable[[dict], object] | None = None
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)


def _deep(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


def _row(**changes) -> bytes:
    return json.dumps({**GOOD_ROW, **changes}).encode() + b"\n"


def _job(ctx: dict, **changes) -> dict:
    return {"model": "tiny-base", "training_file": ctx["file"], **changes}


def _hp(ctx: dict, **hp) -> dict:
    return _job(ctx, method={"type": "dpo", "dpo": {"hyperparameters": hp}})


BOUNDARY = "b0undary"


def _multipart(*parts: tuple[str, str | None, bytes], close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


# (case id, request, status, error code)
CASES: list[tuple[str, Upload | Body, int, str]] = [
    # ---- uploads: the file's content
    ("malformed JSON line", Upload(LINE + b"\n{\"prompt\": \"p\", \n"), 400, "invalid_file"),
    ("a UTF-8 BOM", Upload(b"\xef\xbb\xbf" + LINE + b"\n"), 400, "invalid_file"),
    ("invalid UTF-8", Upload(LINE + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n'), 400,
     "invalid_file"),
    ("an empty (0-byte) file", Upload(b""), 400, "invalid_file"),
    ("only blank lines", Upload(b"\n\n  \n"), 400, "invalid_file"),
    ("a line over the line limit", Upload(_row(prompt="p" * 9000)), 400, "invalid_file"),
    ("a file over the size limit", Upload(LINE + b"\n" + (_row(prompt="q" * 1000) * 40)), 413, "file_too_large"),
    ("deeply nested JSON in a line", Upload(_row(prompt=_deep(400))), 400, "invalid_file"),
    ("absurdly nested JSON in a line", Upload(b"[" * 3000 + b"]" * 3000 + b"\n"), 400, "invalid_file"),
    ("a line that is an array", Upload(b"[1, 2, 3]\n"), 400, "invalid_file"),
    ("a line that is null", Upload(b"null\n"), 400, "invalid_file"),
    ("chosen of the wrong type", Upload(_row(chosen=5)), 400, "invalid_file"),
    ("rejected missing", Upload(json.dumps({"prompt": "p", "chosen": "c"}).encode() + b"\n"), 400, "invalid_file"),
    ("chosen identical to rejected", Upload(_row(chosen="same", rejected="same")), 400, "invalid_file"),
    ("an empty prompt", Upload(_row(prompt="")), 400, "invalid_file"),
    ("an empty chosen", Upload(_row(chosen="")), 400, "invalid_file"),
    ("an unknown role", Upload(json.dumps({
        "prompt": [{"role": "wizard", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}]}).encode() + b"\n"), 400, "invalid_file"),
    ("a message without content", Upload(json.dumps({
        "prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}]}).encode() + b"\n"), 400, "invalid_file"),
    ("a NaN in a row", Upload(b'{"prompt": NaN, "chosen": "a", "rejected": "b"}\n'), 400, "invalid_file"),
    ("an infinite number in a row", Upload(b'{"prompt": 1e999, "chosen": "a", "rejected": "b"}\n'), 400,
     "invalid_file"),
    ("mixed formats", Upload(LINE + b"\n" + json.dumps({
        "input": {"messages": [{"role": "user", "content": "p"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}]}).encode() + b"\n"), 400, "invalid_file"),
    # ---- uploads: the request around the file
    ("wrong purpose", Upload(purpose="assistants"), 400, "invalid_purpose"),
    ("missing purpose", Upload(purpose=None), 400, "missing_required_parameter"),
    ("an unknown form field", Upload(extra_fields={"model": "x"}), 400, "unknown_parameter"),
    ("no file part", Upload(raw=_multipart(("purpose", None, b"fine-tune"))), 400, "missing_required_parameter"),
    ("two file parts", Upload(raw=_multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE),
                                             ("file", "b.jsonl", LINE))), 400, "invalid_value"),
    ("a multipart body cut short", Upload(raw=_multipart(("purpose", None, b"fine-tune"),
                                                         ("file", "a.jsonl", LINE + b"\n"), close=False)), 400,
     "invalid_multipart"),
    ("a part header of 20 kB", Upload(raw=_multipart(("purpose", None, b"fine-tune")).replace(
        b'name="purpose"', b'name="purpose"; x="' + b"a" * 20_000 + b'"')), 400, "invalid_multipart"),
    ("not multipart", Upload(raw=LINE, content_type="application/json"), 400, "invalid_content_type"),
    ("multipart without a boundary", Upload(raw=LINE, content_type="multipart/form-data"), 400,
     "invalid_content_type"),
    ("too many parts", Upload(raw=_multipart(*[("purpose", None, b"fine-tune")] * 20)), 400,
     "invalid_multipart"),
    ("an Idempotency-Key of 256 characters", Upload(headers={"Idempotency-Key": "k" * 256}), 400,
     "invalid_idempotency_key"),
    ("no API key", Upload(headers={"Authorization": ""}), 401, "invalid_api_key"),
    ("an unknown key", Upload(headers={"Authorization": "Bearer sk-sdpo-unknown"}), 401, "invalid_api_key"),
    ("an upload reusing an Idempotency-Key", Upload(headers={"Idempotency-Key": "used-once"}), 409,
     "idempotency_key_reused"),
    # ---- job bodies: JSON itself
    ("malformed JSON body", Body(raw=b'{"model": "tiny-base",'), 400, "invalid_json"),
    ("an empty body", Body(raw=b""), 400, "invalid_json"),
    ("invalid UTF-8 body", Body(raw=b'{"model": "\xff"}'), 400, "invalid_json"),
    ("NaN in the body", Body(raw=b'{"model": "tiny-base", "seed": NaN}'), 400, "invalid_json"),
    ("Infinity in the body", Body(raw=b'{"model": "tiny-base", "seed": Infinity}'), 400, "invalid_json"),
    ("an integer of 5,000 digits", Body(raw=b'{"model": "tiny-base", "seed": ' + b"9" * 5000 + b"}"), 400,
     "invalid_json"),
    ("absurdly nested body", Body(raw=b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
     "invalid_json"),
    ("deeply nested metadata", Body(json=lambda c: _job(c, metadata={"k": _deep(50)})), 400, "invalid_metadata"),
    ("deeply nested hyperparameters", Body(json=lambda c: _hp(c, beta=_deep(50))), 400, "invalid_hyperparameter"),
    # ---- job bodies: types and values
    ("model of the wrong type", Body(json=lambda c: _job(c, model=5)), 400, "invalid_type"),
    ("training_file of the wrong type", Body(json=lambda c: _job(c, training_file=["file-x"])), 400,
     "invalid_type"),
    ("method a string", Body(json=lambda c: _job(c, method="dpo")), 400, "invalid_type"),
    ("metadata a list", Body(json=lambda c: _job(c, metadata=["a"])), 400, "invalid_type"),
    ("an empty model", Body(json=lambda c: _job(c, model="")), 400, "model_not_found"),
    ("an empty training_file", Body(json=lambda c: _job(c, training_file="")), 400, "file_not_found"),
    ("an empty suffix with bad characters", Body(json=lambda c: _job(c, suffix=" ")), 400, "invalid_value"),
    ("a NUL in the model name", Body(json=lambda c: _job(c, model="tiny-base\x00")), 400, "invalid_value"),
    ("a NUL in a metadata key", Body(json=lambda c: _job(c, metadata={"k\x00": "v"})), 400, "invalid_value"),
    ("a model path that is not registered", Body(json=lambda c: _job(c, model="/models/SmolLM2-135M")), 400,
     "model_not_found"),
    ("a model path with ../", Body(json=lambda c: _job(c, model="../../etc/passwd")), 400, "model_not_found"),
    ("a huge integer seed", Body(json=lambda c: _job(c, seed=10**30)), 400, "invalid_value"),
    ("a huge integer n_epochs", Body(json=lambda c: _hp(c, n_epochs=10**30)), 400, "invalid_hyperparameter"),
    ("a huge integer batch_size", Body(json=lambda c: _hp(c, batch_size=2**63)), 400, "invalid_hyperparameter"),
    ("an overflowing float beta (1e999)", Body(raw=None, json=lambda c: _hp(c, beta="__INF__")), 400,
     "invalid_hyperparameter"),
    ("a learning rate that underflows to 0", Body(json=lambda c: _hp(c, learning_rate=1e-400)), 400,
     "invalid_hyperparameter"),
    ("a huge n_steps", Body(json=lambda c: _job(c, method={"type": "sdpo", "sdpo": {
        "partition": {"strategy": "random", "n_steps": 10**20}}})), 400, "too_many_steps"),
    ("negative partition sizes", Body(json=lambda c: _job(c, method={"type": "sdpo", "sdpo": {
        "partition": {"strategy": "random", "n_steps": 2, "sizes": [-1, 7]}}})), 400, "invalid_value"),
    ("an unknown field in the dpo block", Body(json=lambda c: _job(c, method={"type": "dpo", "dpo": {"x": 1}})),
     400, "unknown_parameter"),
    ("a file still validating", Body(json=lambda c: _job(c, training_file=c["validating"])), 400,
     "file_not_processed"),
    ("a deleted file", Body(json=lambda c: _job(c, training_file=c["deleted"])), 400, "file_not_found"),
    ("an Idempotency-Key replay with another body", Body(json=lambda c: _job(c, seed=2),
                                                         headers={"Idempotency-Key": "used-once"}), 409,
     "idempotency_key_reused"),
]


@pytest.fixture
def limited(make_client):
    return make_client(**LIMITS)


@pytest.fixture
def ctx(limited, db, user_key, base_model, settings) -> dict:
    """Alice's good file, a deleted one, one still validating, and a used Idempotency-Key."""

    def upload(rows):
        r = limited.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                         files={"file": ("x.jsonl", jsonl_bytes(rows), "application/jsonl")})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    good = upload(preference_rows(4))
    deleted = upload(preference_rows(2, start=9))
    assert limited.delete(f"/v1/files/{deleted}", headers=bearer(user_key)).status_code == 200
    validating = file_row(db, "alice", status="validating").id
    first = limited.post(JOBS, headers={**bearer(user_key), "Idempotency-Key": "used-once"},
                         json={"model": "tiny-base", "training_file": good, "seed": 1})
    assert first.status_code == 200, first.text
    return {"file": good, "deleted": deleted, "validating": validating}


def _send(client, key: str, request: Upload | Body, ctx: dict):
    headers = {**bearer(key), **request.headers}
    headers = {k: v for k, v in headers.items() if v}
    if isinstance(request, Upload):
        if request.raw is not None:
            headers["Content-Type"] = request.content_type or f"multipart/form-data; boundary={BOUNDARY}"
            return client.post("/v1/files", headers=headers, content=request.raw)
        data = {**({"purpose": request.purpose} if request.purpose is not None else {}), **request.extra_fields}
        return client.post("/v1/files", headers=headers, data=data,
                           files={"file": (request.filename, request.content, "application/jsonl")})
    headers["Content-Type"] = "application/json"
    if request.raw is not None:
        return client.post(JOBS, headers=headers, content=request.raw)
    body = json.dumps(request.json(ctx)).replace('"__INF__"', "1e999")
    return client.post(JOBS, headers=headers, content=body.encode())


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("request_", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_and_changes_nothing(limited, ctx, user_key, count_rows, settings, redis_client,
                                                  request_, status, code):
    before_rows, before_store = count_rows(), stored_objects(settings)
    redis_client.flushdb()  # the fixture's own job sent a message; count only this request's
    response = _send(limited, user_key, request_, ctx)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert count_rows() == before_rows
    assert stored_objects(settings) == before_store
    assert redis_client.llen(settings.light_queue) == 0


def test_crlf_lines_are_valid_and_stored_byte_for_byte(limited, user_key, settings):
    content = b"\r\n".join(jsonl_bytes([r]).rstrip(b"\n") for r in preference_rows(3)) + b"\r\n"
    response = limited.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                            files={"file": ("crlf.jsonl", content, "application/jsonl")})
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == 3
    assert limited.get(f"/v1/files/{response.json()['id']}/content", headers=bearer(user_key)).content == content


@pytest.mark.parametrize("filename", ["../../etc/passwd", "..\\..\\boot.ini", "a/../../b.jsonl", "\x00evil\n.jsonl",
                                      "." * 300])
def test_a_hostile_filename_is_only_a_cleaned_label(limited, user_key, settings, filename):
    response = limited.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                            files={"file": (filename, LINE + b"\n", "application/jsonl")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "/" not in body["filename"] and "\\" not in body["filename"] and "\x00" not in body["filename"]
    assert 0 < len(body["filename"]) <= 255
    [stored] = stored_objects(settings)
    assert stored.name == body["id"] and stored.is_relative_to(settings.storage_dir)


@pytest.mark.parametrize(("path", "params", "status", "code"), [
    (JOBS, {"limit": "abc"}, 400, "invalid_type"),
    (JOBS, {"limit": str(10**30)}, 400, "invalid_value"),
    (JOBS, {"limit": "-1"}, 400, "invalid_value"),
    (JOBS, {"after": "x" * 5000}, 400, "invalid_cursor"),
    ("/v1/files", {"order": "sideways"}, 400, "invalid_value"),
    ("/v1/files/" + "f" * 5000, {}, 404, "file_not_found"),
    ("/v1/files/..%2F..%2Fetc%2Fpasswd", {}, 404, None),
    ("/v1/files/file-x%00/content", {}, 400, "invalid_value"),
    (JOBS, {"after": "ftjob-\x00"}, 400, "invalid_value"),
    (JOBS + "/ftjob-nope/events", {"after": "evt-x"}, 404, "job_not_found"),
    (JOBS + "/ftjob-nope/checkpoints/ftckpt-x/content", {}, 404, "job_not_found"),
    ("/v1/models/" + "m" * 5000, {}, 404, "model_not_found"),
])
def test_bad_query_and_path_parameters(limited, user_key, path, params, status, code):
    response = limited.get(path, headers=bearer(user_key), params=params)
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code
