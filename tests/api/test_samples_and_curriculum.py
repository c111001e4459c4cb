"""Issue #17 in the job spec: per-step samples (method.<type>.samples) and the pair-level curriculum
(partition pair_easy_to_hard, rescore): accepted and echoed, each bad value a 400 naming its field,
and the samples endpoint reading what a step stored."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.models import Job, JobStep
from tests.conftest import bearer, preference_rows

JOBS = "/v1/fine_tuning/jobs"


def _sdpo(train: str, partition: dict, validation: str | None = None, samples: dict | None = None) -> dict:
    body: dict = {"model": "tiny-base", "training_file": train,
                  "method": {"type": "sdpo", "sdpo": {"partition": partition}}}
    if samples is not None:
        body["method"]["sdpo"]["samples"] = samples
    if validation is not None:
        body["validation_file"] = validation
    return body


def test_pair_curriculum_without_sources_and_samples_are_echoed(client, upload, user_key, base_model):
    train = upload(user_key, preference_rows(9, sources=()))["id"]
    valid = upload(user_key, preference_rows(4))["id"]
    r = client.post(JOBS, json=_sdpo(train, {"strategy": "pair_easy_to_hard", "n_steps": 3, "rescore": True}, valid,
                                     {"n_prompts": 2, "max_new_tokens": 16}), headers=bearer(user_key))
    assert r.status_code == 200, r.text
    sdpo = r.json()["method"]["sdpo"]
    assert sdpo["partition"]["strategy"] == "pair_easy_to_hard" and sdpo["partition"]["rescore"] is True
    assert sdpo["samples"] == {"n_prompts": 2, "max_new_tokens": 16}


@pytest.mark.parametrize("partition, samples, with_validation, param", [
    ({"strategy": "random", "n_steps": 2, "rescore": True}, None, True, "method.sdpo.partition.rescore"),
    ({"strategy": "pair_easy_to_hard", "n_steps": 2, "rescore": "yes"}, None, True, "method.sdpo.partition.rescore"),
    ({"strategy": "random", "n_steps": 2}, {"n_prompts": 2}, False, "validation_file"),
    ({"strategy": "random", "n_steps": 2}, {"n_prompts": 0}, True, "method.sdpo.samples.n_prompts"),
    ({"strategy": "random", "n_steps": 2}, {"n_prompts": 2, "max_new_tokens": 4096}, True,
     "method.sdpo.samples.max_new_tokens"),
    ({"strategy": "random", "n_steps": 2}, {"n_prompts": 2, "temperature": 1}, True, "method.sdpo.samples.temperature"),
    ({"strategy": "random", "n_steps": 2}, {"max_new_tokens": 8}, True, "method.sdpo.samples.n_prompts"),
])
def test_bad_values_are_400_naming_the_field(client, upload, user_key, base_model, partition, samples,
                                            with_validation, param):
    train = upload(user_key, preference_rows(10))["id"]
    valid = upload(user_key, preference_rows(4))["id"] if with_validation else None
    r = client.post(JOBS, json=_sdpo(train, partition, valid, samples), headers=bearer(user_key))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_samples_endpoint_reads_the_step_and_says_why_there_are_none(client, db, upload, user_key, other_key,
                                                                     base_model):
    train = upload(user_key, preference_rows(10))["id"]
    valid = upload(user_key, preference_rows(4))["id"]
    job_id = client.post(JOBS, json=_sdpo(train, {"strategy": "random", "n_steps": 2}, valid, {"n_prompts": 2}),
                         headers=bearer(user_key)).json()["id"]
    samples = {"prompts": ["a?", "b?"], "answers": ["A", "B"], "base_answers": ["x", "y"], "max_new_tokens": 48,
               "seed": 0, "seconds": 0.25, "base_seconds": 0.5}
    step = db.scalars(select(JobStep).where(JobStep.job_id == job_id, JobStep.index == 1)).one()
    step.metrics = {"first_loss": 0.69, "samples": samples}
    db.commit()

    r = client.get(f"{JOBS}/{job_id}/steps/1/samples", headers=bearer(user_key))
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "fine_tuning.job.step.samples", "index": 1, "output_checkpoint": None, **samples}
    steps = client.get(f"{JOBS}/{job_id}/steps", headers=bearer(user_key)).json()["data"]
    assert "samples" not in steps[0]["metrics"] and steps[0]["metrics"]["samples_seconds"] == 0.25

    missing = client.get(f"{JOBS}/{job_id}/steps/2/samples", headers=bearer(user_key))
    assert missing.status_code == 404 and "yet" in missing.json()["error"]["message"]
    assert client.get(f"{JOBS}/{job_id}/steps/3/samples", headers=bearer(user_key)).json()["error"]["code"] == \
        "step_not_found"
    assert client.get(f"{JOBS}/{job_id}/steps/1/samples", headers=bearer(other_key)).status_code == 404
    assert db.get(Job, job_id) is not None
