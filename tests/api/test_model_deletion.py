"""DELETE /v1/models/{model} (#18), through the official `openai` SDK against a real server: the
owner's fine-tuned model goes from the list and cannot start a job, its job and checkpoints stay;
another owner's model answers 404, a system model 403, a model an unfinished job starts from 409."""

from __future__ import annotations

import io

import openai
import pytest

from core.models import Job, RegisteredModel
from core.storage import LocalStorage
from tests.api.factories import checkpoint_row, file_row, fine_tuned_model_row, job_row
from tests.conftest import jsonl_bytes, preference_rows


@pytest.fixture
def sdk(live_server, user_key, base_model):
    client = openai.OpenAI(api_key=user_key, base_url=f"{live_server}/v1", max_retries=0, timeout=30)
    yield client
    client.close()


@pytest.fixture
def fine_tuned(db, settings, tmp_path, base_model) -> RegisteredModel:
    """A succeeded job of alice's with a stored checkpoint, registered as her fine-tuned model."""
    job = job_row(db, "alice", file_row(db, "alice").id)
    tree = tmp_path / "ckpt"
    tree.mkdir()
    (tree / "config.json").write_text("{}")
    checkpoint = checkpoint_row(db, job, 1, storage=LocalStorage(settings.storage_dir), tree=tree)
    model = fine_tuned_model_row(db, job, checkpoint)
    job.fine_tuned_model = model.id
    db.commit()
    return model


def _upload(sdk: openai.OpenAI):
    return sdk.files.create(file=("pairs.jsonl", io.BytesIO(jsonl_bytes(preference_rows(10)))), purpose="fine-tune")


def test_owner_deletes_a_fine_tuned_model(sdk, fine_tuned, db):
    training = _upload(sdk)
    assert fine_tuned.id in [m.id for m in sdk.models.list()]
    assert sdk.fine_tuning.jobs.create(model=fine_tuned.id, training_file=training.id).status == "queued"
    sdk.fine_tuning.jobs.cancel(sdk.fine_tuning.jobs.list(limit=1).data[0].id)  # so the model is free again

    deleted = sdk.models.delete(fine_tuned.id)
    assert isinstance(deleted, openai.types.ModelDeleted)
    assert (deleted.id, deleted.object, deleted.deleted) == (fine_tuned.id, "model", True)

    assert fine_tuned.id not in [m.id for m in sdk.models.list()]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve(fine_tuned.id)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:  # exactly like an unknown model
        sdk.fine_tuning.jobs.create(model=fine_tuned.id, training_file=training.id)
    assert refused.value.code == "model_not_found" and refused.value.param == "model"
    with pytest.raises(openai.NotFoundError):  # deleted once: gone
        sdk.models.delete(fine_tuned.id)

    # Its job and checkpoints stay, and the checkpoint still branches.
    job = sdk.fine_tuning.jobs.retrieve(fine_tuned.job_id)
    assert job.fine_tuned_model == fine_tuned.id
    [checkpoint] = sdk.fine_tuning.jobs.checkpoints.list(fine_tuned.job_id).data
    assert checkpoint.id == fine_tuned.checkpoint_id
    branched = sdk.fine_tuning.jobs.create(model=checkpoint.id, training_file=training.id)
    assert branched.status == "queued"
    db.expire_all()
    assert db.get(RegisteredModel, fine_tuned.id).deleted_at is not None  # the row stays for its jobs


def test_delete_is_refused_while_an_unfinished_job_starts_from_it(sdk, fine_tuned, db):
    training = _upload(sdk)
    job = sdk.fine_tuning.jobs.create(model=fine_tuned.id, training_file=training.id)
    for status in ("queued", "running", "paused"):
        db.get(Job, job.id).status = status
        db.commit()
        with pytest.raises(openai.ConflictError) as caught:
            sdk.models.delete(fine_tuned.id)
        assert caught.value.code == "model_in_use" and job.id in caught.value.message
        assert caught.value.param == "model"
    db.get(Job, job.id).status = "succeeded"
    db.commit()
    assert sdk.models.delete(fine_tuned.id).deleted is True


def test_other_owners_and_system_models(sdk, fine_tuned, live_server, other_key):
    with openai.OpenAI(api_key=other_key, base_url=f"{live_server}/v1", max_retries=0) as bob:
        with pytest.raises(openai.NotFoundError) as caught:
            bob.models.delete(fine_tuned.id)
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            bob.models.delete("no-such-model")
    with pytest.raises(openai.PermissionDeniedError) as system:
        sdk.models.delete("tiny-base")
    assert system.value.code == "model_not_deletable" and system.value.param == "model"
    assert {"tiny-base", fine_tuned.id} <= {m.id for m in sdk.models.list()}  # both untouched
