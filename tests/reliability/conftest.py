"""Fault fixtures: the e2e service (uvicorn + Celery workers + Postgres + Redis, real training) with
hooks to break it for real: SIGKILL a worker (and its training child), freeze a training child,
restart a Postgres or a Redis of the test's own.

The database and broker restarts use private servers (a Postgres cluster made with initdb, a
redis-server on a free port), never the shared ones on 5432/6379, so other test runs on the same
machine are not disturbed. Every server a test starts is stopped in a `finally`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from sqlalchemy import select

from core.db import make_engine, make_session_factory, session_scope
from core.models import Checkpoint, Event, Job, JobStep
from core.settings import Settings
from tests.conftest import create_postgres_database, drop_postgres_database
from tests.e2e.conftest import Service, free_port, upload

# Fast failure detection for tests; production keeps the defaults (15 s beats, 120 s stale).
FAST = {"SDPO_STEP_HEARTBEAT_SECONDS": "1", "SDPO_STEP_STALE_SECONDS": "8", "SDPO_STEP_SAVE_STEPS": "4",
        "SDPO_MAX_STEP_ATTEMPTS": "3", "SDPO_DB_RETRY_SECONDS": "120"}


def training_rows(n_per_source: int, seed: int = 11) -> list[dict]:
    from sdpo_engine.sample_data import make_pairs

    return make_pairs(n_per_source, seed=seed)


def dpo_body(file_id: str, *, seed: int = 0, n_epochs: int = 2, batch_size: int = 2) -> dict:
    """One step with many optimizer steps (rows / batch_size * n_epochs): room to break it mid-way."""
    return {"model": "sdpo-tiny", "training_file": file_id, "seed": seed,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": batch_size,
                                                                 "max_length": 64}}}}


def _stderr_names(proc: psutil.Process, text: str) -> bool:
    try:
        return text in os.readlink(f"/proc/{proc.pid}/fd/2")
    except OSError:
        return False


class FaultyService(Service):
    """The e2e `Service`, plus ways to break it and to look at its database."""

    def __init__(self, home: Path, database_url: str, broker_url: str, tiny_model: Path, env: dict | None = None):
        super().__init__(home, database_url, broker_url, tiny_model)
        self.env.update(FAST)
        self.env.update(env or {})
        self._engine = make_engine(database_url)
        self._sessions = make_session_factory(self._engine)
        self._names = 0

    # -- processes

    @property
    def train_queue(self) -> str:
        return self.env["SDPO_TRAIN_QUEUE"]

    @property
    def light_queue(self) -> str:
        return self.env["SDPO_LIGHT_QUEUE"]

    def settings(self) -> Settings:
        """The service's settings, for a producer of the test's own."""
        return Settings(home=self.home, database_url=self.database_url, broker_url=self.broker_url,
                        light_queue=self.light_queue, train_queue=self.train_queue)

    def start_worker(self, name: str | None = None, *, queues: str = "train,light",
                     beat: bool = False) -> subprocess.Popen:
        """A worker on the service's `train` and/or `light` queue (names of this run's own)."""
        self._names += 1
        name = name or f"w{self._names}"
        log_path = self.home / f"worker-{name}.log"
        names = ",".join({"train": self.train_queue, "light": self.light_queue}[q] for q in queues.split(","))
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", names, "--concurrency", "1",
               "-n", f"{name}@%h", "--loglevel", "INFO"]
        if beat:
            cmd += ["-B", "-s", str(self.home / f"beat-{name}")]
        proc = subprocess.Popen(cmd, env=self.env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.workers.append(proc)
        self._wait(lambda: "ready" in log_path.read_text(), proc, f"worker {name}")
        return proc

    def restart_api(self) -> str:
        """SIGKILL the API process and start a new one on the same port (clients keep their URL)."""
        api = next(p for p in self.procs if "uvicorn" in " ".join(map(str, p.args)))
        api.kill()
        api.wait()
        self.procs.remove(api)
        port = self.url.rsplit(":", 1)[1]
        log = open(self.home / "api.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
                                 "--host", "127.0.0.1", "--port", port], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self._wait(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200, proc, "API")
        return self.url

    @staticmethod
    def kill_tree(proc: subprocess.Popen, *, with_training: bool = True) -> list[int]:
        """SIGKILL a Celery worker: the main process, its pool process and (with_training) the
        training child, which runs in a session of its own. As if its host lost power."""
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
        if not with_training:
            victims = [root]  # the pool process dies with it (Celery's PDEATHSIG); the child gets SIGTERM
        pids = [v.pid for v in victims]
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        return pids

    @staticmethod
    def training_processes(job_id: str | None = None) -> list[psutil.Process]:
        """Live `python -m sdpo_engine step` processes (of one job: its spec path names it). A warm
        engine process (`python -m sdpo_engine warm`, worker/supervisor.py) keeps its command line
        when it takes a step; its stderr, the step's engine.log under the job's folder, names the job.
        Without `job_id`, idle warm processes count too."""
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if "sdpo_engine" not in cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if "step" in cmd and (job_id is None or any(job_id in part for part in cmd)):
                out.append(p)
            elif "warm" in cmd and (job_id is None or _stderr_names(p, job_id)):
                out.append(p)
        return out

    def wait_training(self, job_id: str, timeout: float = 300) -> psutil.Process:
        found: list[psutil.Process] = []

        def check():
            found[:] = self.training_processes(job_id)
            return bool(found)

        wait_for(check, timeout, f"a training process of {job_id}")
        return found[0]

    def trainer_checkpoints(self, job_id: str, index: int = 1) -> list[int]:
        """Global steps of the complete trainer checkpoints (trainer_state.json is written last)."""
        root = self.home / "storage" / "work" / job_id / f"step-{index}"
        return sorted(int(p.parent.name.rsplit("-", 1)[1])
                      for p in root.glob("attempt-*/trainer/checkpoint-*/trainer_state.json"))

    def freeze_at_checkpoint(self, job_id: str, at_least: int, timeout: float = 300) -> tuple[psutil.Process, int]:
        """Wait for a complete trainer checkpoint of global step >= `at_least`, then SIGSTOP the
        training process (training however fast, the fault then hits it mid-step). Returns the
        frozen process and the newest complete checkpoint's global step."""
        wait_for(lambda: any(n >= at_least for n in self.trainer_checkpoints(job_id)), timeout,
                 f"a trainer checkpoint >= {at_least} of {job_id}", interval=0.02)
        child = self.wait_training(job_id)
        child.send_signal(signal.SIGSTOP)
        return child, max(self.trainer_checkpoints(job_id))

    @staticmethod
    def wait_signal_pending(child: psutil.Process, sig: int, timeout: float = 60) -> None:
        """Wait until `sig` is pending on a stopped process (the worker has sent it; it acts on it
        once continued): a fault then lands mid-step however fast the rest of the step would run."""
        bit = 1 << (sig - 1)

        def pending() -> bool:
            with open(f"/proc/{child.pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            return bool((int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)) & bit)

        wait_for(pending, timeout, f"signal {sig} pending on {child.pid}", interval=0.05)

    # -- the database, read directly

    @contextmanager
    def session(self):
        with session_scope(self._sessions) as s:
            yield s

    def job_row(self, job_id: str) -> dict:
        with self.session() as s:
            job = s.get(Job, job_id)
            return {"status": job.status, "error": job.error, "current_step": job.current_step}

    def step_rows(self, job_id: str) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(JobStep).where(JobStep.job_id == job_id).order_by(JobStep.index))
            return [{"index": r.index, "status": r.status, "attempt": r.attempt, "worker": r.worker,
                     "output": r.output_checkpoint_id, "error": r.error, "metrics": r.metrics} for r in rows]

    def events(self, job_id: str) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))
            return [{"id": e.id, "type": e.type, "level": e.level, "message": e.message, "data": e.data or {},
                     "step": e.step_index} for e in rows]

    def metric_steps(self, job_id: str, index: int = 1) -> list[int]:
        return [e["data"]["global_step"] for e in self.events(job_id)
                if e["type"] == "metrics" and e["step"] == index]

    def checkpoints(self, job_id: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Checkpoint.id).where(Checkpoint.job_id == job_id)))

    def close(self) -> None:
        self._engine.dispose()


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout} s for {what}")


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 600) -> dict:
    job: dict = {}

    def check():
        nonlocal job
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job.get("status") in statuses

    try:
        wait_for(check, timeout, f"job {job_id} to be {statuses}", interval=0.5)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last seen: {job}") from None
    return job


# ------------------------------------------------------------------------------------------------
# Private servers


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found or not found[-1]:
        raise RuntimeError(f"{name} not found: install Postgres (CI has it)")
    return found[-1]


class PrivatePostgres:
    """A Postgres cluster of the test's own (initdb on a free port), to stop and start at will."""

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sdpo-pg-"))
        shutil.chown(self.dir, user="postgres")
        self.data = self.dir / "data"
        self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                          "-E", "UTF8")
        self.server_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-t", "60",
                          "-l", str(self.dir / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: running queries are cut off and clients disconnected (what a restart does)."""
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the test's own without persistence: a restart loses every message."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 30, "the private redis-server")

    def ping(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_connect_timeout=1)
            ok = client.ping()
            client.close()
            return ok
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # no save: everything queued is gone
            self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdpo_engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("fault-models") / "sdpo-tiny")


@pytest.fixture
def make_service(tmp_path, postgres_server_url, tiny_model_dir):
    """Factory: a FaultyService with a fresh database (on the shared Postgres unless another server
    is given) and a redis-server of its own (unless a broker is given); everything it started is
    stopped after the test."""
    made: list[tuple[FaultyService, str]] = []
    brokers: list[PrivateRedis] = []

    def make(*, server_url: str | None = None, broker_url: str | None = None, env: dict | None = None):
        database_url = create_postgres_database(server_url or postgres_server_url, prefix="sdpo_fault")
        if broker_url is None:
            # A broker of its own: the shared Redis db 14 is flushed by any e2e run on this machine.
            brokers.append(PrivateRedis())
            brokers[-1].start()
            broker_url = brokers[-1].url
        home = tmp_path / f"home{len(made)}"
        home.mkdir()
        svc = FaultyService(home, database_url, broker_url, tiny_model_dir, env=env)
        made.append((svc, database_url))
        return svc

    yield make
    for svc, database_url in made:
        for child in FaultyService.training_processes():  # frozen or orphaned ones included
            try:
                if str(svc.home) in " ".join(child.cmdline()):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
        svc.stop()
        svc.close()
        try:
            drop_postgres_database(database_url)
        except Exception:  # a private server may be gone already
            pass
    for broker in brokers:
        broker.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def upload_rows(client: httpx.Client, tmp_path: Path, rows: list[dict], name: str = "train.jsonl") -> str:
    from sdpo_engine.sample_data import write_jsonl

    return upload(client, write_jsonl(rows, tmp_path / name))


def processes_gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)

