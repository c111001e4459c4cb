"""The official `openai` SDK, pointed at a real server on 127.0.0.1, works unchanged: files,
dpo and sdpo jobs, pagination, retrieve, cancel, events, checkpoints, models, and errors."""

from __future__ import annotations

import io

import openai
import pytest

from core.models import Job
from core.storage import LocalStorage
from tests.api.factories import checkpoint_row
from tests.conftest import FORMATS, jsonl_bytes, preference_rows


@pytest.fixture
def sdk(live_server, user_key, base_model) -> openai.OpenAI:
    client = openai.OpenAI(api_key=user_key, base_url=f"{live_server}/v1", max_retries=0, timeout=30)
    yield client
    client.close()


def _upload(sdk: openai.OpenAI, rows: list[dict], name: str = "pairs.jsonl"):
    return sdk.files.create(file=(name, io.BytesIO(jsonl_bytes(rows))), purpose="fine-tune")


def test_files_round_trip(sdk):
    created = [_upload(sdk, preference_rows(8, fmt=fmt), f"{fmt}.jsonl") for fmt in FORMATS]
    for fmt, f in zip(FORMATS, created, strict=True):
        assert isinstance(f, openai.types.FileObject)
        assert f.object == "file" and f.purpose == "fine-tune" and f.status == "processed"
        assert f.filename == f"{fmt}.jsonl" and f.model_extra["format"] == fmt and f.model_extra["rows"] == 8

    listed = sdk.files.list(limit=2)
    assert [f.id for f in listed.data] == [created[2].id, created[1].id] and listed.has_more
    assert [f.id for f in sdk.files.list(limit=2)] == [f.id for f in created[::-1]]  # auto-pagination

    retrieved = sdk.files.retrieve(created[0].id)
    assert retrieved.id == created[0].id and retrieved.bytes == created[0].bytes
    assert sdk.files.content(created[0].id).content == jsonl_bytes(preference_rows(8, fmt="standard"))

    deleted = sdk.files.delete(created[0].id)
    assert deleted.deleted is True and deleted.id == created[0].id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created[0].id)


def test_invalid_upload_raises_bad_request_with_line_report(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(b'{"prompt": "p"}\nnot json\n')), purpose="fine-tune")
    assert caught.value.code == "invalid_file"
    assert {e["line"] for e in caught.value.body["errors"]} == {1, 2}


def test_jobs_with_the_sdk(sdk, db, settings, tmp_path):
    training = _upload(sdk, preference_rows(10))
    dpo = sdk.fine_tuning.jobs.create(
        model="tiny-base", training_file=training.id, seed=11, suffix="sdk", metadata={"via": "sdk"},
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2,
                                                           "learning_rate_multiplier": "auto"}}},
    )
    assert isinstance(dpo, openai.types.fine_tuning.FineTuningJob)
    assert dpo.status == "queued" and dpo.object == "fine_tuning.job" and dpo.seed == 11
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2
    assert dpo.method.dpo.hyperparameters.n_epochs == 2 and dpo.model_extra["n_steps"] == 1

    second = _upload(sdk, preference_rows(6, start=100))
    sdpo = sdk.fine_tuning.jobs.create(
        model="tiny-base", training_file=training.id,
        method={"type": "sdpo", "sdpo": {"hyperparameters": {"beta": 0.1},  # type: ignore[typeddict-item]
                                         "steps": [{"training_file": training.id},
                                                   {"training_file": second.id,
                                                    "hyperparameters": {"beta": 0.3}}]}},
    )
    assert sdpo.status == "queued" and sdpo.model_extra["n_steps"] == 2
    assert sdpo.method.type == "sdpo"

    partitioned = sdk.fine_tuning.jobs.create(
        model="tiny-base", training_file=training.id,
        method={"type": "sdpo", "sdpo": {"partition": {"strategy": "stratified", "n_steps": 2}}},  # type: ignore
    )
    ids = [partitioned.id, sdpo.id, dpo.id]

    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[:2] and page.has_more
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=2)] == ids  # follows `after` across pages
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"via": "sdk"})] == [dpo.id]

    assert sdk.fine_tuning.jobs.retrieve(dpo.id).id == dpo.id
    cancelled = sdk.fine_tuning.jobs.cancel(dpo.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(dpo.id)

    events = sdk.fine_tuning.jobs.list_events(dpo.id, limit=1)
    assert events.data[0].message == "Job cancelled." and events.has_more
    assert [e.message.split(" ")[0] for e in sdk.fine_tuning.jobs.list_events(dpo.id)] == ["Job", "Created"]

    job_row = db.get(Job, sdpo.id)
    tree = tmp_path / "ckpt"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    stored = checkpoint_row(db, job_row, 1, storage=LocalStorage(settings.storage_dir), tree=tree)
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(sdpo.id)
    [ckpt] = checkpoints.data
    assert ckpt.id == stored.id and ckpt.object == "fine_tuning.job.checkpoint" and ckpt.step_number == 1
    assert ckpt.metrics.train_loss == 0.5 and ckpt.fine_tuning_job_id == sdpo.id

    assert "tiny-base" in [m.id for m in sdk.models.list()]


def test_sdk_errors(sdk, live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.fine_tuning.jobs.create(model="no-such-model", training_file="file-x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-nope")
    bad_key = openai.OpenAI(api_key="sk-sdpo-wrong", base_url=f"{live_server}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.files.list()
