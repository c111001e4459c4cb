"""`sdpo files upload` prints the validation report's warnings (issue #13) and names Parquet rows,
against a real API server (uvicorn, Postgres)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import jsonl_bytes, preference_rows


@pytest.fixture(autouse=True)
def _clean(clean_state):
    yield


def _sdpo(url: str, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env.update({"SDPO_URL": url, "SDPO_API_KEY": key})
    return subprocess.run([sys.executable, "-m", "sdpo_cli.main", "files", "upload", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _rows_with_smells() -> list[dict]:
    rows = preference_rows(22)
    rows[3] = dict(rows[2])
    for row in rows:
        row["chosen"] += " Let me explain why at length."
    return rows


def test_upload_prints_the_warnings(make_live_server, user_key, tmp_path):
    url = make_live_server()
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(_rows_with_smells()))
    done = _sdpo(url, user_key, str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("file-")
    lines = done.stderr.splitlines()
    assert lines[0].startswith("valid standard jsonl file: 22 pairs") and lines[0].endswith("2 warning(s)")
    assert lines[1] == ("warning duplicate_pairs: 1 pair: the same prompt, chosen and rejected as an earlier pair "
                        "(each copy is trained on again) (lines 4)")
    assert lines[2].startswith("warning length_bias: 22 pairs: chosen is the longer answer, in 100% of the pairs")
    assert lines[2].endswith("(lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10…)")
    as_json = _sdpo(url, user_key, "--json", str(path))
    assert [w["code"] for w in json.loads(as_json.stdout)["warnings"]] == ["duplicate_pairs", "length_bias"]


def test_upload_of_a_parquet_file_names_rows(make_live_server, user_key, tmp_path):
    url = make_live_server()
    rows = _rows_with_smells()
    good = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), good)
    done = _sdpo(url, user_key, str(good))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0].startswith("valid standard parquet file: 22 pairs")
    assert "(rows 4)" in done.stderr
    rows[5]["rejected"] = rows[5]["chosen"]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(buffer.getvalue())
    done = _sdpo(url, user_key, str(bad))
    assert done.returncode != 0
    assert "row 6: rejected: is the same text as chosen" in done.stderr
