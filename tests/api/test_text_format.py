"""Job creation and the model's text handling (#13 kinds 1 and 4): text_format, chat_template, and
message-list files on a model without a chat template refused with a 400 before anything is written."""

from __future__ import annotations

import json

import pytest

from core.models import RegisteredModel
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture
def notemplate(db, tmp_path) -> RegisteredModel:
    """A system model whose saved tokenizer has no chat template (as the shared case's tiny-notemplate)."""
    path = tmp_path / "notemplate"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    row = RegisteredModel(id="notemplate", owner=None, source="local", uri=path.as_uri(),
                          default_hyperparameters={"learning_rate": 1e-3})
    db.add(row)
    db.commit()
    return row


def _dpo(file_id: str, model: str = "notemplate", **options) -> dict:
    return {"model": model, "training_file": file_id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {}, **options}}}


@pytest.mark.parametrize("fmt", ["conversational", "openai"])
def test_message_lists_on_a_model_without_a_template_are_a_400(client, upload, user_key, notemplate, count_rows,
                                                               fmt):
    file_id = upload(user_key, preference_rows(4, fmt=fmt))["id"]
    before = count_rows()
    r = client.post(JOBS, headers=bearer(user_key), json=_dpo(file_id))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("no_chat_template", "training_file")
    assert "'notemplate' has no chat template" in error["message"] and file_id in error["message"]
    assert count_rows() == before


def test_the_step_file_and_the_validation_file_are_named(client, upload, user_key, notemplate):
    strings = upload(user_key, preference_rows(4))["id"]
    messages = upload(user_key, preference_rows(4, fmt="conversational"))["id"]
    r = client.post(JOBS, headers=bearer(user_key), json={
        "model": "notemplate", "method": {"type": "sdpo", "sdpo": {
            "steps": [{"training_file": strings}, {"training_file": messages}]}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.sdpo.steps[1].training_file"
    r = client.post(JOBS, headers=bearer(user_key), json={**_dpo(strings), "validation_file": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"


def test_strings_train_on_a_model_without_a_template_and_a_supplied_template_lifts_the_refusal(
        client, upload, user_key, notemplate):
    strings = upload(user_key, preference_rows(4))["id"]
    r = client.post(JOBS, headers=bearer(user_key), json=_dpo(strings))
    assert r.status_code == 200, r.text
    assert r.json()["method"]["dpo"]["text_format"] == "chat"
    messages = upload(user_key, preference_rows(4, fmt="conversational"))["id"]
    r = client.post(JOBS, headers=bearer(user_key), json=_dpo(messages, chat_template=TEMPLATE))
    assert r.status_code == 200, r.text
    assert r.json()["method"]["dpo"]["chat_template"] == TEMPLATE


@pytest.mark.parametrize("options, fmt, code, param", [
    ({"text_format": "raw"}, "conversational", "raw_needs_strings", "training_file"),
    ({"text_format": "markdown"}, "standard", "invalid_value", "method.dpo.text_format"),
    ({"text_format": "raw", "chat_template": TEMPLATE}, "standard", "conflicting_parameters", "method.dpo.chat_template"),
    ({"chat_template": "  "}, "standard", "invalid_value", "method.dpo.chat_template"),
    ({"chat_template": "x" * 70_000}, "standard", "invalid_value", "method.dpo.chat_template"),
])
def test_bad_text_options_are_a_400(client, upload, user_key, base_model, count_rows, options, fmt, code, param):
    file_id = upload(user_key, preference_rows(4, fmt=fmt))["id"]
    before = count_rows()
    r = client.post(JOBS, headers=bearer(user_key), json=_dpo(file_id, model="tiny-base", **options))
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (code, param)
    assert count_rows() == before


def test_raw_text_is_echoed_on_the_sdpo_method(client, upload, user_key, base_model):
    file_id = upload(user_key, preference_rows(6))["id"]
    r = client.post(JOBS, headers=bearer(user_key), json={
        "model": "tiny-base", "training_file": file_id,
        "method": {"type": "sdpo", "sdpo": {"text_format": "raw",
                                            "partition": {"strategy": "random", "n_steps": 2}}}})
    assert r.status_code == 200, r.text
    assert r.json()["method"]["sdpo"]["text_format"] == "raw"
    assert r.json()["method"]["sdpo"]["chat_template"] is None


def test_the_shared_multiturn_case_is_a_400_on_a_model_without_a_template(client, user_key, notemplate, count_rows):
    from pathlib import Path

    case = Path(__file__).resolve().parents[2].parent / "shared" / "cases" / "04-no-chat-template-multiturn.jsonl"
    r = client.post("/v1/files", headers=bearer(user_key), data={"purpose": "fine-tune"},
                    files={"file": (case.name, case.read_bytes(), "application/jsonl")})
    assert r.status_code == 200, r.text
    before = count_rows()
    r = client.post(JOBS, headers=bearer(user_key), json=_dpo(r.json()["id"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    assert count_rows() == before
