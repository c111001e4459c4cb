"""Parquet preference files (Hugging Face `datasets`-style): told by their bytes, read a batch of rows
at a time with pyarrow, validated row by row, and giving the same report and pairs as the same
pairs in JSONL. One engine run trains from a Parquet file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdpo_engine.data import DataError, load_numbered_pairs, load_pairs, validate_file
from sdpo_engine.sample_data import make_pairs
from tests.conftest import FORMATS, jsonl_bytes, preference_rows


def _parquet(rows: list[dict], path: Path, **kwargs) -> Path:
    # The schema is the union of every row's fields (from_pylist alone would take the first row's).
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def _jsonl(rows: list[dict], path: Path) -> Path:
    path.write_bytes(jsonl_bytes(rows))
    return path


def _smelly_rows(fmt: str) -> list[dict]:
    """Valid rows with warnings: an ignored field, an exact and a near duplicate, a length bias."""
    rows = preference_rows(40, fmt=fmt)
    for i, row in enumerate(rows):
        row["id"] = i if i % 3 else None  # null in Parquet, left out in JSONL
    rows[7] = dict(rows[6])
    if fmt == "standard":
        rows[9] = {**rows[8], "prompt": rows[8]["prompt"].upper()}
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_parquet_file_gives_the_same_report_and_pairs_as_the_same_jsonl(tmp_path, fmt):
    rows = _smelly_rows(fmt)
    jsonl_rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    as_jsonl = _jsonl(jsonl_rows, tmp_path / "pairs.jsonl")
    as_parquet = _parquet(rows, tmp_path / "pairs.parquet", row_group_size=16)  # several row groups
    report_jsonl, report_parquet = validate_file(as_jsonl), validate_file(as_parquet)
    assert (report_jsonl.pop("file_type"), report_parquet.pop("file_type")) == ("jsonl", "parquet")
    assert report_parquet == report_jsonl
    assert report_parquet["valid"] and report_parquet["format"] == fmt and report_parquet["rows"] == 40
    assert {w["code"] for w in report_parquet["warnings"]} >= {"ignored_fields", "duplicate_pairs"}
    assert load_numbered_pairs(as_parquet) == load_numbered_pairs(as_jsonl)


def test_content_parts_and_nested_nulls_in_parquet(tmp_path):
    rows = [{"input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                                  {"type": "text", "text": "planet."}]}]},
             "preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "Mars."}]}],
             "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "The Moon."}]}]}]
    [pair] = load_pairs(_parquet(rows, tmp_path / "parts.parquet"))
    assert pair["prompt"] == [{"role": "user", "content": "Name a planet."}]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Mars.", "The Moon.")


def test_bad_rows_are_reported_by_row_number(tmp_path):
    rows = preference_rows(5)
    rows[1]["chosen"] = None  # a null answer
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[4]["source"] = " "
    path = _parquet(rows, tmp_path / "bad.parquet")
    report = validate_file(path)
    assert report["file_type"] == "parquet" and not report["valid"] and report["rows"] == 5
    assert [(e["line"], e["field"], e["reason"]) for e in report["errors"]] == [
        (2, "chosen", "missing"),
        (3, "rejected", "is the same text as chosen"),
        (5, "source", "is empty; leave the field out (or null) for a row without a source"),
    ]
    with pytest.raises(DataError, match=r"3 problem\(s\); first: row 2, chosen: missing"):
        load_pairs(path)


def test_the_file_type_is_told_by_its_bytes_not_its_name(tmp_path):
    rows = preference_rows(3)
    parquet_named_jsonl = _parquet(rows, tmp_path / "pairs.jsonl")
    jsonl_named_parquet = _jsonl(rows, tmp_path / "pairs.parquet")
    assert validate_file(parquet_named_jsonl)["file_type"] == "parquet"
    assert validate_file(jsonl_named_parquet)["file_type"] == "jsonl"
    assert load_pairs(parquet_named_jsonl) == load_pairs(jsonl_named_parquet)


def test_unreadable_empty_and_ambiguous_parquet_files(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    [error] = validate_file(corrupt)["errors"]
    assert (error["line"], error["field"]) == (0, None)
    assert error["reason"].startswith("not a readable Parquet file")

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), empty)
    assert validate_file(empty)["errors"] == [{"line": 0, "field": None, "reason": "file is empty"}]

    repeated = tmp_path / "repeated.parquet"
    column = pa.array(["q"])
    pq.write_table(pa.Table.from_arrays([column, pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                                        names=["prompt", "chosen", "chosen", "rejected"]), repeated)
    [error] = validate_file(repeated)["errors"]
    assert (error["line"], error["field"]) == (0, "chosen")
    assert error["reason"].startswith("column or struct field name repeated")


def test_a_parquet_row_over_the_line_limit_is_refused(tmp_path):
    rows = preference_rows(3)
    rows[1]["prompt"] = "x" * 5000
    report = validate_file(_parquet(rows, tmp_path / "long.parquet"), max_line_bytes=4096)
    [error] = report["errors"]
    assert error["line"] == 2 and error["reason"].startswith("row is ") and "the limit is 4096" in error["reason"]


def test_the_engine_trains_an_sdpo_run_from_a_parquet_file(tmp_path, tiny_model):
    """`run --train-file x.parquet`: partitioned into chunks and trained; the chunks hold exactly the
    Parquet file's pairs."""
    pairs = make_pairs(6, seed=5)
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "source": p["source"]}
            for p in pairs]
    train = _parquet(rows, tmp_path / "train.parquet")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sdpo_engine", "run", "--model", str(tiny_model), "--train-file", str(train),
         "--partition", "random", "--steps", "2", "--out", str(out), "--learning-rate", "1e-3",
         "--batch-size", "4", "--max-length", "96", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["index"] for s in summary["steps"]] == [1, 2]
    chunked = load_pairs(out / "data" / "step-1.jsonl") + load_pairs(out / "data" / "step-2.jsonl")
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert sorted(map(key, chunked)) == sorted(map(key, load_pairs(train)))
    assert len(chunked) == len(rows)


def test_parquet_is_read_a_batch_at_a_time_never_as_a_whole_table(tmp_path, monkeypatch):
    rows = preference_rows(600)
    path = _parquet(rows, tmp_path / "pairs.parquet")
    batches = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    assert validate_file(path)["rows"] == 600
    assert sum(batches) == 600 and max(batches) <= 256 and len(batches) >= 3
