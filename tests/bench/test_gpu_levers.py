"""bench/gpu_levers.py, the device check of issue #19: how a variant's fields reach the engine, what the
budget drops, and (slow) the whole script on CPU, so it is known to run before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_levers  # noqa: E402


def test_fields_parse_as_json_values_or_strings():
    assert gpu_levers.parse_fields(["attention=flex", "pack_tokens=0", "group_by_length=true",
                                    "reference_batch_size=null", "x= 1.5"]) == {
        "attention": "flex", "pack_tokens": 0, "group_by_length": True, "reference_batch_size": None, "x": 1.5}
    with pytest.raises(ValueError, match="not key=value"):
        gpu_levers.parse_fields(["attention"])


def test_fields_route_to_spec_hyperparameters_or_unknown():
    spec, hp, unknown = gpu_levers.route_fields(
        {"pack_tokens": 0, "pad_to_multiple_of": 64, "beta": 0.2, "no_such_lever": 1, "output_dir": "/x"})
    assert spec == {"pack_tokens": 0, "pad_to_multiple_of": 64}
    assert hp == {"beta": 0.2}
    assert unknown == ["no_such_lever", "output_dir"]  # the script's own keys cannot be overridden


def test_budget_skips_what_would_end_late_but_never_the_baselines():
    walls = {False: [40.0, 50.0], True: []}  # process seconds of finished variants, by whether they compiled
    assert gpu_levers.skip_reason("tuned", {}, 1000, 420, walls) is None
    assert gpu_levers.skip_reason("engine", {}, 1000, 420, walls) is None
    assert gpu_levers.skip_reason("flex", {"attention": "flex"}, 370, 420, walls) is None  # 370 + 50 <= 420
    assert gpu_levers.skip_reason("flex", {"attention": "flex"}, 371, 420, walls).startswith("budget")
    # the first compiling variant: 1.5 x the slowest other; then the slowest compiling one
    assert gpu_levers.estimate_seconds({"compile": "layers"}, walls) == 75.0
    assert gpu_levers.skip_reason("compile", {"compile": "layers"}, 360, 420, walls).startswith("budget")
    walls[True].append(180.0)
    assert gpu_levers.estimate_seconds({"compile": "layers"}, walls) == 180.0
    assert gpu_levers.estimate_seconds({"compile": "off"}, walls) == 50.0  # a slow compile does not drop the rest


@pytest.mark.slow
def test_whole_script_on_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_levers.py"), "--size", "tiny", "--pairs", "16", "--batch-size", "4",
         "--shape", "48:16", "--variants", "engine,one_pair_per_row", "--add", "bogus:no_such_lever=1",
         "--out-dir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(records) == ["tuned", "engine", "one_pair_per_row", "bogus"]
    assert records["bogus"]["status"] == "skipped"
    assert records["bogus"]["reason"] == "unknown spec field: no_such_lever"
    for name in ("engine", "one_pair_per_row"):
        r = records[name]
        assert r["status"] == "ok", r
        assert r["logged_steps"] == [4, 4]  # 16 pairs / batch 4, one epoch, both sides
        assert r["max_loss_diff"] < 1e-4  # float32 on CPU: the same math as TRL's
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    assert records["one_pair_per_row"]["fields"] == {"pack_tokens": 0}
    with tarfile.open(out / "raw.tar.gz") as raw:
        assert {"tuned.stdout", "engine.stderr", "one_pair_per_row.stdout"} <= set(raw.getnames())
    assert "unknown spec field: no_such_lever" in (out / "summary.txt").read_text()
