"""The job page of a gated sDPO job: the gate's outcome in the header and the drift-from-base chart
per step (M0 = the base, 0), in a real browser against the real API + worker (screenshot in
artifacts/ui/)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import upload, wait_job
from tests.e2e.test_gates import _data
from tests.ui.conftest import login, screenshot


@pytest.mark.slow
def test_gate_outcome_and_drift_chart_on_the_job_page(service, browser, page, tmp_path):
    service.start_api()
    service.start_worker("w1")
    client = service.client()
    step1, step2, held, _ = _data(tmp_path)
    files = [upload(client, step1), upload(client, step2)]
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdpo-tiny", "validation_file": upload(client, held), "seed": 0,
        "method": {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 2},
                                             "steps": [{"training_file": f} for f in files],
                                             "gate": {"metric": "eval.reward_margin", "on_fail": "rollback"}}}})
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded" and job["gate"]["status"] == "failed", service.logs()

    login(page, service.url, service.admin_key, next_path=f"/ui/jobs/{job['id']}")
    gate = page.wait_for_selector("#gate[data-status=failed]")
    assert "failed after step 2" in gate.inner_text() and "result is step 1" in gate.inner_text()
    # Three series (chosen and rejected log-ratio per token, reward margin) at M0, M1, M2.
    page.wait_for_selector("#chart-drift[data-points='9']")
    time.sleep(0.5)  # let the last frame paint
    assert screenshot(page, "job-page-gate-drift").stat().st_size > 10_000
    assert page.errors == []
