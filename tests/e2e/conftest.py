"""End-to-end fixtures: the real thing in separate processes.

`service` starts uvicorn (the API) and Celery worker processes against a fresh Postgres
database, a Redis database of its own and a temp storage folder, with the built-in tiny model
registered. Tests talk to it over HTTP only, as a user would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.db import make_engine, make_session_factory, session_scope
from core.migrate import upgrade_head
from core.models import RegisteredModel
from tests.conftest import create_postgres_database, drop_postgres_database

E2E_REDIS_DB = 14  # the API tests use 15; each e2e service flushes this one
TINY_DEFAULTS = {"learning_rate": 1e-3, "beta": 0.1, "batch_size": 4, "max_length": 96}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdpo_engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("e2e-models") / "sdpo-tiny")


class Service:
    """API + workers in child processes, all sharing one database, broker and store."""

    def __init__(self, home: Path, database_url: str, broker_url: str, tiny_model: Path):
        self.home = home
        self.database_url = database_url
        self.broker_url = broker_url
        self.admin_key = "sk-sdpo-e2e-admin-" + secrets.token_hex(16)
        self.env = {**os.environ, "SDPO_HOME": str(home), "SDPO_DATABASE_URL": database_url,
                    "SDPO_BROKER_URL": broker_url, "SDPO_STORAGE_DIR": str(home / "storage"),
                    "SDPO_ADMIN_KEY": self.admin_key, "SDPO_STEP_HEARTBEAT_SECONDS": "1",
                    "SDPO_DEVICE": "cpu", "PYTHONUNBUFFERED": "1",
                    # queues of their own, so concurrent test runs on one Redis never mix
                    "SDPO_LIGHT_QUEUE": f"sdpo.light.e2e-{secrets.token_hex(4)}",
                    "SDPO_TRAIN_QUEUE": f"sdpo.train.e2e-{secrets.token_hex(4)}"}
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.url = ""
        upgrade_head(database_url)
        with session_scope(make_session_factory(make_engine(database_url))) as s:
            s.add(RegisteredModel(id="sdpo-tiny", owner=None, source="local", uri=f"file://{tiny_model}",
                                  default_hyperparameters=dict(TINY_DEFAULTS)))

    def start_api(self) -> str:
        port = free_port()
        log = open(self.home / "api.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
                                 "--host", "127.0.0.1", "--port", str(port)], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.url = f"http://127.0.0.1:{port}"
        self._wait(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200, proc, "API")
        return self.url

    def start_worker(self, name: str) -> subprocess.Popen:
        log = open(self.home / f"worker-{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                                 f"{self.env['SDPO_TRAIN_QUEUE']},{self.env['SDPO_LIGHT_QUEUE']}", "--concurrency", "1", "-n", f"{name}@%h",
                                 "--loglevel", "INFO"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.workers.append(proc)
        self._wait(lambda: "ready" in (self.home / f"worker-{name}.log").read_text(), proc, f"worker {name}")
        return proc

    def _wait(self, check, proc, what: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}; see {self.home}"
            try:
                if check():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not start in {timeout} s")

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.admin_key}"},
                            timeout=60)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.home.glob("*.log")))


@pytest.fixture
def service(tmp_path, postgres_server_url, redis_url, tiny_model_dir) -> Iterator[Service]:
    """A fresh service (database, broker db, store); the test starts the API and workers it needs."""
    database_url = create_postgres_database(postgres_server_url, prefix="sdpo_e2e")
    broker_url = redis_url.rsplit("/", 1)[0] + f"/{E2E_REDIS_DB}"
    # No flushdb: queue names are unique per service, and flushing would erase the messages of
    # another test run sharing this Redis database.
    (tmp_path / "home").mkdir()
    svc = Service(tmp_path / "home", database_url, broker_url, tiny_model_dir)
    try:
        yield svc
    finally:
        svc.stop()
        drop_postgres_database(database_url)


def sample_files(tmp_path: Path) -> tuple[Path, Path]:
    """A small two-source training file and a held-out file (the demo's data, smaller)."""
    from sdpo_engine.sample_data import make_pairs, write_jsonl

    return (write_jsonl(make_pairs(12, seed=21), tmp_path / "train.jsonl"),
            write_jsonl(make_pairs(4, seed=22), tmp_path / "heldout.jsonl"))


def upload(client: httpx.Client, path: Path) -> str:
    with open(path, "rb") as fh:
        r = client.post("/v1/files", files={"file": (path.name, fh, "application/jsonl")},
                        data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {timeout} s: {json.dumps(job)}")


def sdpo_job(model: str, training_file: str, validation_file: str | None = None, **hyper) -> dict:
    body = {"model": model, "training_file": training_file, "seed": 0,
            "method": {"type": "sdpo", "sdpo": {"hyperparameters": {"n_epochs": 1, **hyper},
                                                 "partition": {"strategy": "random", "n_steps": 2}}}}
    if validation_file:
        body["validation_file"] = validation_file
    return body
