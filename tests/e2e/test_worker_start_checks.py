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

# Five real worker starts, four of them importing torch for the device check: ~30 s. The unit test
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


@pytest.mark.parametrize(("env", "reason", "host_trains"), [
    # Host-independent: the spec's own rule, no torch asked.
    ({"SDPO_ATTENTION": "flex", "SDPO_PACKING": "off", "SDPO_DEVICE": "auto"}, "needs packing true", lambda: False),
    # This host: CI has no CUDA, so auto resolves to cpu, where FlexAttention has no backward.
    ({"SDPO_ATTENTION": "flex", "SDPO_DEVICE": "auto"}, "SDPO_ATTENTION=flex (SDPO_DEVICE=auto, here cpu)",
     torch.cuda.is_available),
    ({"SDPO_DEVICE": "cuda"}, "SDPO_DEVICE=cuda: device cuda requested but no CUDA device is available",
     torch.cuda.is_available),
    # GPUs the host lacks: `auto` would have trained on the CPU without a word.
    ({"SDPO_WORKER_GPUS": "0,1"}, "SDPO_WORKER_GPUS names 2 GPU(s) but torch sees", lambda: torch.cuda.device_count() >= 2),
])
def test_a_training_worker_refuses_settings_its_host_cannot_train(service, env, reason, host_trains):
    proc, log = _start(service, "train", f"{service.env['SDPO_TRAIN_QUEUE']},{service.env['SDPO_LIGHT_QUEUE']}", env)
    if host_trains():  # a host with the GPUs trains these: the worker must start
        assert proc.poll() is None and "ready" in log, log[-3000:]
        return
    assert proc.wait(timeout=30) != 0, log[-3000:]
    assert "this host cannot train with its settings" in log and reason in log, log[-3000:]
    assert "ready" not in log


def test_a_light_only_worker_with_the_same_settings_starts(service):
    proc, log = _start(service, "light", service.env["SDPO_LIGHT_QUEUE"], {"SDPO_ATTENTION": "flex", "SDPO_DEVICE": "auto"})
    assert proc.poll() is None and "ready" in log, log[-3000:]
