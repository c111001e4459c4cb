"""The paper reproduction's pipeline, reduced (`--quick`: one seed, small data): it runs end to end and
writes the report with its tables and plots. It checks the pipeline, not the paper's conclusions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_reproduction_writes_report_tables_and_plots(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.paper", "--quick", "--out", str(out), "--work", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    report = (out / "paper-reproduction.md").read_text()
    for heading in ("## Summary", "## Setting", "## Commands and run times",
                    "## 1. Figure 2", "## 2. Figure 3", "## 3. Tables 2 and 3", "## 4. The same comparison"):
        assert heading in report, heading
    assert "Quick mode" in report
    # the results table has a row per model, with numbers
    for label in ("S (SFT base, no DPO)", "DPO, all data at once", "sDPO, random split", "sDPO, easy-to-hard",
                  "sDPO, hard-to-easy"):
        row = next((line for line in report.splitlines() if line.startswith(f"| {label} |")), None)
        assert row is not None, label
        assert any(ch.isdigit() for ch in row)
    assert "| seed | step-2 source | γ_S (train)" in report
    assert "| seed | first batch loss, from M1 |" in report

    plots = out / "paper-plots"
    for name in ("fig2_gamma_ref.png", "fig3_step2_loss.png", "heldout_preference_accuracy.png",
                 "heldout_reward_margin.png", "training_loss.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"](paper-plots/{name})" in report, name

    # the pipeline's invariants (mechanics, not conclusions): every step starts at ln 2
    results = json.loads((work / "results.json").read_text())
    runs = results["parts"]["tiny"]["runs"]["0"]
    for method in ("dpo", "random", "easy_to_hard", "hard_to_easy"):
        for step in runs[method]["steps"]:
            assert math.isclose(step["first_loss"], math.log(2), abs_tol=1e-4), (method, step["index"])
    assert len(runs["dpo"]["steps"]) == 1 and len(runs["easy_to_hard"]["steps"]) == 2
    # equal total optimizer steps for every method
    totals = {m: sum(s["global_steps"] for s in runs[m]["steps"]) for m in runs}
    assert len(set(totals.values())) == 1, totals
