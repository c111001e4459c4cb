"""Per-step samples and the pair-level curriculum through the service (issue #17): a 2-step job on a
training file without any source, partitioned pair_easy_to_hard, with samples; the API serves each
step's answers (step 1 also the base's), and the job page shows them side by side base -> M1 -> M2 in
a real browser (screenshot in artifacts/ui/)."""

from __future__ import annotations

import time

import pytest

from sdpo_engine.sample_data import make_pairs, write_jsonl
from tests.e2e.conftest import upload, wait_job
from tests.ui.conftest import login, screenshot


@pytest.mark.slow
def test_samples_side_by_side_on_the_job_page_of_a_pair_curriculum_job(service, browser, page, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    rows = [{k: v for k, v in p.items() if k != "source"} for p in make_pairs(12, seed=21)]
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    held = write_jsonl(make_pairs(4, seed=22), tmp_path / "heldout.jsonl")
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "training_file": upload(client, train), "validation_file": upload(client, held),
        "seed": 0, "method": {"type": "sdpo", "sdpo": {
            "hyperparameters": {"n_epochs": 1, "learning_rate": 5e-3},
            "partition": {"strategy": "pair_easy_to_hard", "n_steps": 2},
            "samples": {"n_prompts": 2, "max_new_tokens": 8}}}})
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", service.logs()

    # The chunks were ordered by the base model: its identity is in the plan of the job's start event.
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    plan = next(e["data"]["partition"] for e in events if (e.get("data") or {}).get("partition"))
    assert plan["strategy"] == "pair_easy_to_hard" and plan["pair_scores"]["1"]["pairs"] == len(rows), plan
    assert plan["pair_scores"]["1"]["sha256"], plan
    s1 = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps/1/samples").json()
    s2 = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps/2/samples").json()
    assert len(s1["prompts"]) == 2 and len(s1["base_answers"]) == 2 and s2["base_answers"] is None
    assert s1["prompts"] == s2["prompts"] and s1["seconds"] > 0 and s2["seconds"] > 0
    steps = client.get(f"/v1/fine_tuning/jobs/{job['id']}/steps").json()["data"]
    print("generation seconds per step:", [(s["index"], s["metrics"]["samples_seconds"]) for s in steps],
          "base:", s1["base_seconds"], "step seconds:", [s["metrics"].get("train_seconds") for s in steps])

    login(page, service.url, service.admin_key, next_path=f"/ui/jobs/{job['id']}")
    table = page.wait_for_selector("#samples[data-columns='3']")
    headers = [t.split("\n")[0].lower() for t in page.locator("#samples thead th").all_inner_texts()]
    assert headers == ["prompt", "base", "m1", "m2"]  # the stylesheet upper-cases table headers
    assert page.locator("#samples tbody tr").count() == 2
    assert page.inner_text("#samples tbody tr:first-child td[data-model=M2]") == s2["answers"][0]
    assert s1["prompts"][0] in table.inner_text()
    time.sleep(0.5)  # let the last frame paint
    assert screenshot(page, "job-page-samples").stat().st_size > 10_000
    assert page.errors == []
