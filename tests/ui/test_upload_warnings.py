"""The dashboard's upload page shows the validation report's warnings (issue #13) and takes Parquet
files, in a real headless Chromium."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import jsonl_bytes, preference_rows
from tests.ui.conftest import login, screenshot


@pytest.fixture
def clean(clean_state):
    yield


def test_upload_page_lists_warnings_and_reads_parquet(clean, browser, page, live_server, user_key, tmp_path):
    login(page, live_server, user_key, next_path="/ui/upload")
    rows = preference_rows(21)
    rows[4] = dict(rows[3])  # a duplicate, at line 5
    for row in rows:
        row["chosen"] += " Let me explain at length."  # chosen always the longer answer
    smelly = tmp_path / "smelly.jsonl"
    smelly.write_bytes(jsonl_bytes(rows))
    page.set_input_files("#file-input", str(smelly))
    page.click("#upload-button")
    page.wait_for_selector("#report[data-valid=true]")
    assert page.inner_text("#warning-badge") == "2 warnings"
    duplicate = page.inner_text("#report-warnings tr[data-code=duplicate_pairs]")
    assert "1 pair: the same prompt, chosen and rejected" in duplicate and duplicate.rstrip().endswith("5")
    bias = page.inner_text("#report-warnings tr[data-code=length_bias]")
    assert "in 100% of the pairs" in bias and "1, 2, 3, 4, 5, 6, 7, 8, 9, 10…" in bias
    screenshot(page, "upload-warnings")

    clean_rows = tmp_path / "clean.parquet"
    pq.write_table(pa.Table.from_pylist(preference_rows(6)), clean_rows)
    page.set_input_files("#file-input", str(clean_rows))
    page.click("#upload-button")
    page.wait_for_selector("#file-rows:text-is('6')")  # the new report replaced the first one
    assert "standard (parquet)" in page.inner_text("#report")
    assert page.query_selector("#report-warnings") is None and page.query_selector("#warning-badge") is None

    bad = preference_rows(3)
    bad[1]["rejected"] = bad[1]["chosen"]
    bad_path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(bad), bad_path)
    page.set_input_files("#file-input", str(bad_path))
    page.click("#upload-button")
    report = page.wait_for_selector("#report[data-valid=false]")
    assert page.inner_text("#report .report-errors thead").split()[0].lower() == "row"
    assert "is the same text as chosen" in report.inner_text()
    assert page.errors == []
