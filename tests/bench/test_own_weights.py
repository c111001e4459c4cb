"""bench/own_weights.py on the tiny model: the step with its weights left mapped and as it runs give the same
losses and checkpoint (the script's `same` column), so a later change that breaks either side is seen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # four step processes: ~30 s
def test_own_weights_bench_runs_and_both_sides_agree(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "own_weights.py"), "--model", "tiny", "--epochs", "1",
                           "--pairs", "8", "--repeats", "2", "--cache", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = done.stdout.strip().splitlines()[-1].split()
    assert row[0] == "1" and row[-1] == "yes", done.stdout
    assert float(row[1]) > 0  # wall m/b, a ratio: no claim on its size here
