"""A training worker whose settings cannot train on its host stops at start with the reason
(worker.checks.training_host_problem), instead of failing every user's job at its first step; a
light-only worker with the same settings starts (it trains nothing)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from tests.e2e.conftest import Service

# Four real worker starts, three of them importing torch for the device check: ~30 s. The unit test
# (tests/worker/test_training_settings.py) covers the check's logic in the default run.
pytestmark = pytest.mark.slow


def _start(service: Service, name: str, queues: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    log_path = service.home / f"worker-{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues,
                                 "--concurrency", "1", "-n", f"{name}@%h", "--loglevel", "INFO"],
                                env={**service.env, **env}, stdout=log, stderr=subprocess.STDOUT)
    service.procs.append(proc)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and "ready" not in log_path.read_text():
        time.sleep(0.2)
    return proc, log_path.read_text()


@pytest.mark.parametrize(("env", "reason"), [
    # Host-independent: the spec's own rule, no torch asked.
    ({"SDPO_ATTENTION": "flex", "SDPO_PACKING": "off", "SDPO_DEVICE": "auto"}, "needs packing true"),
    # This host: CI has no CUDA, so auto resolves to cpu, where FlexAttention has no backward.
    ({"SDPO_ATTENTION": "flex", "SDPO_DEVICE": "auto"}, "SDPO_ATTENTION=flex (SDPO_DEVICE=auto, here cpu)"),
    ({"SDPO_DEVICE": "cuda"}, "SDPO_DEVICE=cuda: device cuda requested but no CUDA device is available"),
])
def test_a_training_worker_refuses_settings_its_host_cannot_train(service, env, reason):
    if torch.cuda.is_available() and "packing" not in reason:
        reason = None  # a CUDA host trains these: the worker must start
    proc, log = _start(service, "train", f"{service.env['SDPO_TRAIN_QUEUE']},{service.env['SDPO_LIGHT_QUEUE']}", env)
    if reason is None:
        assert proc.poll() is None and "ready" in log, log[-3000:]
        return
    assert proc.wait(timeout=30) != 0, log[-3000:]
    assert "this host cannot train with its settings" in log and reason in log, log[-3000:]
    assert "ready" not in log


def test_a_light_only_worker_with_the_same_settings_starts(service):
    proc, log = _start(service, "light", service.env["SDPO_LIGHT_QUEUE"], {"SDPO_ATTENTION": "flex", "SDPO_DEVICE": "auto"})
    assert proc.poll() is None and "ready" in log, log[-3000:]
