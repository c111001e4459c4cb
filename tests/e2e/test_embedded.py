"""The embedded default: `sdpo up` with SQLite and kombu's SQLAlchemy transport, no Redis."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from sdpo_cli.demo import run_demo

from .conftest import free_port


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_sdpo_up_runs_the_two_step_demo_job_without_redis_or_postgres(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env.update({"SDPO_HOME": str(home), "SDPO_ADMIN_KEY": "sk-sdpo-embedded-test-key", "SDPO_DEVICE": "cpu"})
    up = subprocess.Popen([sys.executable, "-m", "sdpo_cli.main", "up", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert up.poll() is None, up.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "sdpo up did not become ready"
            time.sleep(0.5)
        out = io.StringIO()
        job = run_demo(url, "sk-sdpo-embedded-test-key", n_epochs=1, timeout=600, out=out, key_shell="$SDPO_ADMIN_KEY")
        report = out.getvalue()
        assert job["status"] == "succeeded", report + "".join((home / "logs" / "worker.log").read_text()[-3000:])
        steps = httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}/steps",
                          headers={"Authorization": "Bearer sk-sdpo-embedded-test-key"}).json()["data"]
        assert steps[1]["reference_checkpoint"] == steps[0]["output_checkpoint"]
        assert "final checkpoint" in report and "heldout_acc" in report
        # everything lives under SDPO_HOME: the SQLite database, the broker's file, the store
        assert (home / "sdpo.db").is_file() and (home / "broker.db").is_file()
        assert list((home / "storage" / "checkpoints" / job["id"]).glob("*/model.safetensors"))
        # The two download commands the demo prints work as pasted into a shell (with the service's env).
        commands = [line.split(": ", 1)[1] for line in report.splitlines() if line.lstrip().startswith(("download:", "or:"))]
        assert len(commands) == 2 and "$SDPO_ADMIN_KEY" in commands[1] and "sk-sdpo" not in report, report
        shell_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}
        for command in commands:
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=shell_env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert (tmp_path / "model" / "config.json").is_file()
        with tarfile.open(tmp_path / "model.tar") as tar:
            assert "model.safetensors" in tar.getnames()
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
