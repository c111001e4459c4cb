"""bench/checkpoint_write.py on a tiny random model: both sides write checkpoints that verify and hold the same
tensors (the script's `same tensors` column), and (b) writes several shards, so a later change that breaks
either side, or stops sharding, is seen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_write_bench_runs_and_both_sides_agree(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_write.py"), "--size", "tiny",
                           "--shard-size", "40KB", "--repeats", "2", "--dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = next(line for line in lines if line.startswith("model:"))
    assert "(a) 1 file, (b) " in summary and "(b) 1 files" not in summary, summary
    row = lines[-1].strip("|").split("|")
    assert row[-1].strip() == "yes", done.stdout
    assert float(row[0].strip(" *")) > 0  # wall a/b, a ratio: no claim on its size here
    assert list(tmp_path.iterdir()) == []  # the script leaves nothing behind
