"""`sdpo demo --model smollm2-135m`: the real SmolLM2-135M-Instruct aligned over HTTP by the
embedded service, with answers before and after (slow: minutes on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_smollm2_demo_aligns_the_real_model_and_prints_answers_before_and_after(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env.update({"SDPO_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1", "SDPO_DEVICE": "cpu"})
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "sdpo_cli.main", "demo", "--model", "smollm2-135m"], env=env,
                          capture_output=True, text=True, timeout=1800)
    elapsed = time.time() - started
    print(done.stdout[-4000:])
    print(f"smollm2 demo wall time: {elapsed:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "registered model smollm2-135m" in out and "fine-tuned model: ft:smollm2-135m:admin:pirate:" in out
    assert out.count("before: ") == 3 and out.count("after:  ") == 3
    assert "Step 2 succeeded" in out
