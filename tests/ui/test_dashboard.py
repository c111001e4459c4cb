"""The dashboard at /ui, in a real headless Chromium: log in with a key, upload a file through the
page and read its validation report; and (slow) start a job from the page and watch the charts
update live and the reference lineage appear, with a screenshot in artifacts/ui/."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import bearer, jsonl_bytes, preference_rows
from tests.e2e.conftest import sample_files
from tests.ui.conftest import login, screenshot


@pytest.fixture
def clean(clean_state):
    yield


def test_pages_are_public_static_files_and_the_data_needs_a_key(clean, client, user_key):
    for path in ("/ui/", "/ui/login", "/ui/upload", "/ui/jobs/ftjob-0123"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing from a CDN
        assert 'src="/ui/static/vendor/chart.umd.min.js"' in page.text
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    script = client.get("/ui/static/vendor/chart.umd.min.js")
    assert script.status_code == 200 and "Chart.js v4" in script.text[:200]
    assert "followEvents" in client.get("/ui/static/app.js").text
    # What the pages show comes from the API, which wants the key.
    assert client.get("/v1/fine_tuning/jobs").status_code == 401
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(user_key)).status_code == 200


def test_log_in_upload_a_file_and_read_its_validation_report(clean, browser, page, live_server, user_key, tmp_path):
    page.goto(f"{live_server}/ui/")
    page.wait_for_url("**/ui/login**")  # no key yet: the login page
    page.fill("#api-key", "sk-sdpo-not-a-key")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:has-text('refused')")
    login(page, live_server, user_key, next_path="/ui/upload")

    good = tmp_path / "pairs.jsonl"
    good.write_bytes(jsonl_bytes(preference_rows(7, sources=("easy", "hard"))))
    page.set_input_files("#file-input", str(good))
    page.click("#upload-button")
    report = page.wait_for_selector("#report[data-valid=true]")
    assert page.inner_text("#file-rows") == "7" and "easy: 4, hard: 3" in report.inner_text()
    file_id = page.inner_text("#file-id")
    assert file_id.startswith("file-")
    assert page.eval_on_selector("#job-training-file", "el => el.value") == file_id  # ready to start a job

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n{not json\n")
    page.set_input_files("#file-input", str(bad))
    page.click("#upload-button")
    report = page.wait_for_selector("#report[data-valid=false]")
    text = report.inner_text()
    assert "invalid" in text and "rejected" in text and "2" in text  # the bad lines, with their reasons
    screenshot(page, "upload-invalid-report")
    assert page.errors == []


@pytest.mark.slow
def test_start_a_job_from_the_page_and_watch_charts_and_lineage_live(service, browser, page, tmp_path):
    service.start_api()
    service.start_worker("w1")
    train, _ = sample_files(tmp_path)
    login(page, service.url, service.admin_key, next_path="/ui/upload")

    page.set_input_files("#file-input", str(train))
    page.click("#upload-button")
    page.wait_for_selector("#report[data-valid=true]")
    page.select_option("#job-model", "sdpo-tiny")
    page.select_option("#job-method", "sdpo")
    page.fill("#job-steps", "2")
    page.select_option("#job-strategy", "random")
    page.fill("#job-epochs", "1")
    page.fill("#job-suffix", "ui")
    page.click("#start-job")
    page.wait_for_url("**/ui/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]

    # The loss chart gets points while step 1 trains, and more later: it updates live.
    # (Selectors, not wait_for_function: the page's CSP forbids the eval that it would need.)
    page.wait_for_selector("#chart-loss:not([data-points='0'])", timeout=240_000)
    first = int(page.get_attribute("#chart-loss", "data-points"))
    page.wait_for_selector(f"#chart-loss:not([data-points='{first}'])", timeout=240_000)
    assert int(page.get_attribute("#chart-loss", "data-points")) > first
    # The lineage: base -> M1 -> M2, each with its checkpoint, once the job has succeeded.
    page.wait_for_selector("#lineage .node[data-step='2'][data-status=succeeded]", timeout=300_000)
    m1 = page.get_attribute("#lineage .node[data-step='1']", "data-checkpoint")
    m2 = page.get_attribute("#lineage .node[data-step='2']", "data-checkpoint")
    assert m1.startswith("ftckpt-") and m2.startswith("ftckpt-") and m1 != m2
    assert f"reference: {m1}" in page.inner_text("#lineage .node[data-step='2']")  # sDPO: M1 is step 2's reference
    page.wait_for_selector("#job-header .badge[data-status=succeeded]")
    time.sleep(0.5)  # let the last frame paint
    for name in ("loss", "margin", "accuracy", "gamma"):
        assert int(page.get_attribute(f"#chart-{name}", "data-points")) > 0, name
    assert int(page.get_attribute("#events", "data-count")) > 5
    assert page.inner_text("#fine-tuned-model") == f"ft:sdpo-tiny:admin:ui:{job_id}"
    shot = screenshot(page, "job-page")
    assert shot.stat().st_size > 10_000
    # The jobs list shows it finished.
    page.goto(f"{service.url}/ui/")
    row = page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "succeeded" in row.inner_text()
    screenshot(page, "jobs-list")
    assert page.errors == []
