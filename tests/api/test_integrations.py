"""A job's `integrations` (#18) through the official `openai` SDK against a real server: created,
stored normalised, echoed on create, retrieve and list. (Bad ones: tests/api/test_job_specs.py.)"""

from __future__ import annotations

import io

import openai
import pytest

from tests.conftest import jsonl_bytes, preference_rows

DEFAULT_MLFLOW = "http://127.0.0.1:5999"  # the admin's own server: trusted, though on loopback


@pytest.fixture
def sdk(make_live_server, user_key, base_model):
    url = make_live_server(mlflow_tracking_uri=DEFAULT_MLFLOW, webhook_allowed_private_networks=["10.9.0.0/16"])
    client = openai.OpenAI(api_key=user_key, base_url=f"{url}/v1", max_retries=0, timeout=30)
    yield client
    client.close()


def test_sdk_creates_a_job_with_integrations_and_reads_them_back(sdk):
    training = sdk.files.create(file=("p.jsonl", io.BytesIO(jsonl_bytes(preference_rows(10)))), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny-base", training_file=training.id,
        integrations=[{"type": "wandb", "wandb": {"project": "sdpo-runs", "tags": ["nightly", "tiny"]}},
                      {"type": "mlflow", "mlflow": {"experiment_name": "sdpo", "run_name": "r1"}}],  # type: ignore
    )
    wandb, mlflow = job.integrations
    assert isinstance(wandb, openai.types.fine_tuning.FineTuningJobWandbIntegrationObject)
    assert wandb.type == "wandb" and wandb.wandb.project == "sdpo-runs" and wandb.wandb.tags == ["nightly", "tiny"]
    assert wandb.wandb.entity is None and wandb.wandb.name is None  # OpenAI echoes the unset ones as null
    # An mlflow entry is kept as given (the SDK's type names only wandb; extra fields survive).
    assert mlflow.type == "mlflow"
    assert mlflow.model_extra["mlflow"] == {"tracking_uri": None, "experiment_name": "sdpo", "run_name": "r1"}

    for read in (sdk.fine_tuning.jobs.retrieve(job.id), sdk.fine_tuning.jobs.list(limit=1).data[0]):
        assert read.id == job.id
        assert [i.model_dump(exclude_none=False) for i in read.integrations] == \
               [i.model_dump(exclude_none=False) for i in job.integrations]

    plain = sdk.fine_tuning.jobs.create(model="tiny-base", training_file=training.id)
    assert plain.integrations == []


def test_tracking_uri_rules(sdk):
    training = sdk.files.create(file=("p.jsonl", io.BytesIO(jsonl_bytes(preference_rows(10)))), purpose="fine-tune")

    def create(uri: str):
        return sdk.fine_tuning.jobs.create(model="tiny-base", training_file=training.id,
                                           integrations=[{"type": "mlflow", "mlflow": {"tracking_uri": uri}}])  # type: ignore

    assert create(DEFAULT_MLFLOW).status == "queued"  # the server default, given explicitly
    assert create("http://10.9.1.2:5000").status == "queued"  # a network the admin allowed
    assert create("https://mlflow.example.com/").status == "queued"  # public: checked again by the worker
    for refused in ("http://127.0.0.1:5998", "http://10.8.0.1:5000", "http://localhost:5000", "http://[::1]:5000"):
        with pytest.raises(openai.BadRequestError) as caught:
            create(refused)
        assert caught.value.param == "integrations[0].mlflow.tracking_uri", refused
        assert caught.value.code == "url_not_allowed", refused
