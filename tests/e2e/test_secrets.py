"""Secrets at rest and in child processes: owner-only files under a fresh SDPO_HOME, and training
processes that never see the admin key or other credentials of the worker."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import free_port, sample_files, upload, wait_job

ENGINE_NEEDS = ("PATH", "PYTHONUNBUFFERED")


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = [item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in items}


class EngineWatcher:
    """Reads /proc/PID/environ of every engine process (`python -m sdpo_engine …`) below `root_pid`
    while they run, from a thread, until stopped."""

    def __init__(self, root_pid: int):
        self.root = psutil.Process(root_pid)
        self.seen: dict[int, tuple[list[str], dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EngineWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    cmd = child.cmdline()
                    if "sdpo_engine" in cmd and child.pid not in self.seen:
                        self.seen[child.pid] = (cmd, _environ(child.pid))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError, PermissionError):
                    continue
            time.sleep(0.05)

    def steps(self) -> list[dict[str, str]]:
        """Environments of the processes that trained a step (a cold `step` child, or a warm one)."""
        return [env for cmd, env in self.seen.values() if "step" in cmd or "warm" in cmd]


def _one_step_job(client: httpx.Client, tmp_path: Path) -> dict:
    train, _held = sample_files(tmp_path)
    body = {"model": "sdpo-tiny", "training_file": upload(client, train), "seed": 0,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "max_length": 64}}}}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return wait_job(client, r.json()["id"])


def _assert_no_secrets(env: dict[str, str], secrets: dict[str, str]) -> None:
    for name, value in secrets.items():
        assert name not in env, f"{name} reached a training process"
        assert not any(value in v for v in env.values()), f"the value of {name} reached a training process"


def test_training_processes_get_an_allow_listed_environment(service, tmp_path):
    """A real worker whose environment holds the admin key, a metrics token, database and broker URLs
    and a cloud credential: the process that trains its step has none of them, and has what the
    engine needs."""
    secrets = {"SDPO_ADMIN_KEY": service.admin_key, "SDPO_METRICS_TOKEN": "metrics-token-for-the-test",
               "AWS_SECRET_ACCESS_KEY": "aws-secret-for-the-test", "SDPO_DATABASE_URL": service.database_url,
               "SDPO_BROKER_URL": service.broker_url, "HF_TOKEN": "hf_hub-token-for-the-test",
               "HUGGING_FACE_HUB_TOKEN": "hf_legacy-token-for-the-test"}
    service.env.update({k: v for k, v in secrets.items() if k not in service.env})
    service.env["SDPO_PACKING"] = "off"  # a training setting: it must reach the step through its spec
    service.start_api()
    worker = service.start_worker("w1")
    assert _environ(worker.pid)["SDPO_ADMIN_KEY"] == service.admin_key  # the worker has it: the filter matters
    with service.client() as client, EngineWatcher(worker.pid) as watcher:
        job = _one_step_job(client, tmp_path)
    assert job["status"] == "succeeded", service.logs()
    trained = watcher.steps()
    assert trained, f"no training process was seen: {watcher.seen}"
    for env in trained:
        _assert_no_secrets(env, secrets)
        assert all(env.get(name) for name in ENGINE_NEEDS), sorted(env)
        # The worker's SDPO_DEVICE=cpu reaches the engine in the step spec (core.settings), not the environment.
        assert not any(name in env for name in ("SDPO_DEVICE", "SDPO_PACKING", "SDPO_PAD_TO_MULTIPLE_OF",
                                                "SDPO_ACTIVATION_CHECKPOINTING", "SDPO_PACK_TOKENS"))
    manifests = [json.loads(path.read_text()) for path in (service.home / "storage").rglob("sdpo_manifest.json")]
    trained_here = [m for m in manifests if "training_settings" in m]  # the base model's has none
    assert trained_here, f"no step checkpoint under {service.home / 'storage'}"
    for manifest in trained_here:
        assert manifest["training_settings"] == {"device": "cpu", "param_dtype": "auto", "compile": "off",
                                                 "packing": False, "pad_to_multiple_of": None,
                                                 "activation_checkpointing": "auto", "pack_tokens": None,
                                                 "attention": "auto", "group_by_length": False,
                                                 "reference_batch_size": None}
        assert manifest["training_applied"]["packing"].startswith("two_sequences: disabled")


@pytest.mark.slow  # 20-60 s of worker processes: in CI's slow run, out of the default run's ~15 min
def test_sdpo_up_under_a_fresh_home_makes_only_owner_only_files(tmp_path):
    """`sdpo up` started with the common umask 022 in a fresh SDPO_HOME; after an upload and a
    one-step job, nothing under the home is readable by group or others: the databases and their
    -wal/-shm, the broker's file, storage (uploads, checkpoints, work folders), logs, the admin key.
    Neither the worker nor its training process has the admin key in its environment."""
    home = tmp_path / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPO_")}
    env.update({"SDPO_HOME": str(home), "SDPO_DEVICE": "cpu"})
    up = subprocess.Popen([sys.executable, "-m", "sdpo_cli.main", "up", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: os.umask(0o022))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while not (home / "service.json").is_file():
            assert up.poll() is None, up.stdout.read()
            assert time.time() < deadline, "sdpo up did not become ready"
            time.sleep(0.5)
        info = json.loads((home / "service.json").read_text())
        key = (home / "admin_key").read_text().strip()
        assert _environ(info["api_pid"])["SDPO_ADMIN_KEY"] == key
        assert "SDPO_ADMIN_KEY" not in _environ(info["worker_pid"])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client, \
                EngineWatcher(info["worker_pid"]) as watcher:
            job = _one_step_job(client, tmp_path)
        assert job["status"] == "succeeded", (home / "logs" / "worker.log").read_text()[-3000:]
        assert watcher.steps()
        for step_env in watcher.steps():
            _assert_no_secrets(step_env, {"SDPO_ADMIN_KEY": key})
        assert list((home / "storage" / "checkpoints" / job["id"]).glob("*/model.safetensors"))
        for name in ("sdpo.db", "broker.db", "admin_key", "logs/api.log", "logs/worker.log"):
            assert (home / name).is_file(), name
        assert list(home.glob("sdpo.db-*")), "the database's WAL files"
        walked = [home, *home.rglob("*")]
        assert len(walked) > 30
        open_to_others = [f"{stat.filemode(p.lstat().st_mode)} {p.relative_to(home)}" for p in walked
                          if not p.is_symlink() and p.lstat().st_mode & 0o077]
        assert open_to_others == []
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
