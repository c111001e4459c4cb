"""Job creation reads the chat template of a model stored in the S3 store (a real moto server):
a checkpoint whose tokenizer has no template is refused for message-list files with the same 400
as a local model, and one with a template is accepted. Only the small template files are read
from the bucket (api/jobs/spec.py `_stored_tokenizer`)."""

from __future__ import annotations

import json
import shutil

import pytest

from core.s3_storage import S3Storage
from tests.api.factories import checkpoint_row, file_row, job_row
from tests.conftest import bearer, jsonl_bytes, preference_rows

JOBS = "/v1/fine_tuning/jobs"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture
def s3(make_client, moto_server, monkeypatch, clean_state, tmp_path):
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{moto_server.new_bucket()}/sdpo"
    return make_client(storage_url=url), S3Storage(url, tmp_path / "cache", max_attempts=2)


def _stored_checkpoint(db, store, tmp_path, step: int, tokenizer_config: dict, **extra: str):
    """A checkpoint of a succeeded job of alice's, stored only in the bucket (its local copy removed)."""
    tree = tmp_path / f"ckpt-{step}"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    (tree / "model.safetensors").write_bytes(b"\0" * 4096)
    (tree / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))
    (tree / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, text in extra.items():
        (tree / name).write_text(text)
    job = job_row(db, "alice", file_row(db, "alice", rows=3).id, status="succeeded")
    row = checkpoint_row(db, job, step, storage=store, tree=tree)  # type: ignore[arg-type]
    shutil.rmtree(tree)
    assert row.uri.startswith("s3://")
    return row


def _upload(client, key, fmt: str) -> str:
    response = client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                           files={"file": ("p.jsonl", jsonl_bytes(preference_rows(4, fmt=fmt)), "text/plain")})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _create(client, key, model: str, file_id: str):
    return client.post(JOBS, headers=bearer(key), json={"model": model, "training_file": file_id,
                                                        "method": {"type": "dpo", "dpo": {"hyperparameters": {}}}})


def test_an_s3_checkpoint_without_a_chat_template_is_refused_for_message_lists(s3, db, base_model, user_key,
                                                                                tmp_path, count_rows):
    client, store = s3
    bare = _stored_checkpoint(db, store, tmp_path, 1, {"eos_token": "<|im_end|>"})
    messages = _upload(client, user_key, "conversational")
    before = count_rows()
    r = _create(client, user_key, bare.id, messages)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("no_chat_template", "training_file")
    assert count_rows() == before
    # Strings need no template: the same checkpoint trains them.
    assert _create(client, user_key, bare.id, _upload(client, user_key, "standard")).status_code == 200


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja"])
def test_an_s3_checkpoint_with_a_chat_template_takes_message_lists(s3, db, base_model, user_key, tmp_path, where):
    client, store = s3
    if where == "tokenizer_config":
        ckpt = _stored_checkpoint(db, store, tmp_path, 1, {"eos_token": "<|im_end|>", "chat_template": TEMPLATE})
    else:  # transformers 4.43+ saves it beside the config
        ckpt = _stored_checkpoint(db, store, tmp_path, 1, {"eos_token": "<|im_end|>"},
                                  **{"chat_template.jinja": TEMPLATE})
    r = _create(client, user_key, ckpt.id, _upload(client, user_key, "conversational"))
    assert r.status_code == 200, r.text
