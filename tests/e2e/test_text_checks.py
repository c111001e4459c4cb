"""The shared cases of #13 kinds 1 and 3 through the API with a real worker: a job never trains on
text it would misread, and pairs without training signal are dropped, counted and shown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .conftest import upload, wait_job

CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"


def _dpo(file_id: str, **options) -> dict:
    hyper = options.pop("hyperparameters", {})
    return {"model": "sdpo-tiny", "training_file": file_id, "seed": 0,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, **hyper}, **options}}}


def _events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_markup_and_no_signal_through_the_api(service, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()

    # Kind 1: pre-templated strings fail at preparation, naming file, line, field and token; nothing trains.
    pretemplated = upload(client, CASES / "02-pretemplated-standard.jsonl")
    job = wait_job(client, client.post("/v1/fine_tuning/jobs", json=_dpo(pretemplated)).json()["id"])
    assert job["status"] == "failed", service.logs()
    assert job["error"]["code"] == "special_tokens_in_text"
    assert f"File {pretemplated}" in job["error"]["message"]
    assert "line 1, prompt: contains '<|im_start|>'" in job["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    steps = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]
    assert all(s["status"] != "succeeded" and s["output_checkpoint"] is None for s in steps)
    assert job["fine_tuned_model"] is None

    # ... and train exactly as given with text_format raw.
    raw = wait_job(client, client.post("/v1/fine_tuning/jobs", json=_dpo(pretemplated, text_format="raw")).json()["id"])
    assert raw["status"] == "succeeded", service.logs()
    (step,) = client.get(f"/v1/fine_tuning/jobs/{raw['id']}/steps").json()["data"]
    assert abs(step["metrics"]["first_loss"] - math.log(2)) < 1e-3

    # Kind 3: every pair identical after truncation: the step fails clearly, nothing is registered.
    truncated = upload(client, CASES / "05-truncation-makes-identical.jsonl")
    job = wait_job(client, client.post("/v1/fine_tuning/jobs", json=_dpo(
        truncated, hyperparameters={"max_length": 48})).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "no_trainable_pairs", job
    assert "4 identical after truncation (lines 1, 2, 3, 4)" in job["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert not [m for m in client.get("/v1/models").json()["data"] if job["id"] in m["id"]]

    # Some pairs without signal: dropped, counted on GET …/steps and told in a warning event.
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in (CASES / "05-truncation-makes-identical.jsonl").read_text().splitlines()]
    rows += [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(4)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = wait_job(client, client.post("/v1/fine_tuning/jobs", json=_dpo(
        upload(client, mixed), hyperparameters={"max_length": 48})).json()["id"])
    assert job["status"] == "succeeded", service.logs()
    (step,) = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]
    assert step["metrics"]["pairs_dropped"] == {"identical_after_truncation": 4}
    assert (step["metrics"]["pairs"], step["metrics"]["pairs_used"]) == (8, 4)
    (warning,) = [e for e in _events(client, job["id"]) if "dropped" in e["message"]]
    assert warning["level"] == "warn"
    assert "4 of 8 pair(s) dropped" in warning["message"] and "lines 1, 2, 3, 4" in warning["message"]


@pytest.mark.slow  # a real worker trains two small jobs: ~30 s
def test_a_validation_file_that_overlaps_the_training_data_is_warned_of_once(service, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()

    def pairs(path: Path, numbers) -> str:
        path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.",
                                            "rejected": f"{i + 2}."}) + "\n" for i in numbers))
        return upload(client, path)

    train = pairs(tmp_path / "train.jsonl", range(8))
    leaked = pairs(tmp_path / "leaked.jsonl", range(5, 11))  # 3 of 6 in training
    unseen = pairs(tmp_path / "unseen.jsonl", range(20, 24))
    for validation, expected in ((leaked, 1), (unseen, 0)):
        job = wait_job(client, client.post("/v1/fine_tuning/jobs",
                                           json={**_dpo(train), "validation_file": validation}).json()["id"])
        assert job["status"] == "succeeded", service.logs()
        warned = [e for e in _events(client, job["id"]) if "overlaps the training data" in e["message"]]
        assert len(warned) == expected, warned
        if expected:
            (event,) = warned
            assert event["level"] == "warn"
            assert f"Validation file {leaked} overlaps the training data ({train}): 3 of its 6 pairs" in event["message"]
            assert "lines 1, 2, 3)" in event["message"]
            assert event["data"]["code"] == "validation_overlap" and event["data"]["same_pairs"] == 3
