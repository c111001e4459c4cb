"""`sdpo up`: the API and one worker together, ready to train, with nothing else installed.

Embedded default: SQLite, kombu's SQLAlchemy transport on its own SQLite file, local storage, all
under SDPO_HOME (./.sdpo). With SDPO_DATABASE_URL and SDPO_BROKER_URL pointing at Postgres and
Redis the same command runs the production way (one API, one worker on this host).

The API and the worker run as child processes (uvicorn, celery): the API process never imports
torch, and a crash of one is visible instead of taking the other down silently.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from sdpo_cli import local

if TYPE_CHECKING:
    from core.settings import Settings

# core (SQLAlchemy, the models, migrations) is imported by the functions that run the service, not
# here: `sdpo` builds its parser from this module for every command, the HTTP ones included.

BUILTIN_MODEL = "sdpo-tiny"


def admin_key(settings: Settings) -> str:
    """SDPO_ADMIN_KEY, else a key generated once and kept in SDPO_HOME/admin_key (mode 600)."""
    from core.permissions import make_private_dir

    if settings.admin_key:
        return settings.admin_key
    path = settings.home / "admin_key"
    if path.is_file():
        return path.read_text().strip()
    key = "sk-sdpo-admin-" + secrets.token_urlsafe(32)
    make_private_dir(settings.home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def register_builtin_model(settings: Settings) -> Path:
    """Build the tiny model on first start (a child process: torch stays out of this one) and
    register it for everyone as `sdpo-tiny`."""
    from core.db import make_engine, make_session_factory, session_scope
    from core.models import RegisteredModel

    target = settings.storage_dir / "models" / BUILTIN_MODEL
    if not (target / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "sdpo_engine", "tiny-model", str(target)], check=True,
                       stdout=subprocess.DEVNULL)
    info = json.loads((target / "sdpo_model.json").read_text())
    factory = make_session_factory(make_engine(settings.database_url))
    with session_scope(factory) as session:
        if session.get(RegisteredModel, BUILTIN_MODEL) is None:
            session.add(RegisteredModel(id=BUILTIN_MODEL, owner=None, source="local", uri=f"file://{target}",
                                        default_hyperparameters=info.get("default_hyperparameters", {})))
    return target


def service_file(settings: Settings) -> Path:
    return settings.home / "service.json"


def running_service(settings: Settings) -> dict | None:
    """The service `sdpo up` started under this SDPO_HOME, if it answers."""
    return local.running_service(settings.home)


def _program(p: subprocess.Popen) -> str:
    """The program of a `python -m <program> …` process (its whole command otherwise), for messages."""
    args = [os.fsdecode(p.args)] if isinstance(p.args, str | bytes | os.PathLike) else [
        os.fsdecode(a) for a in p.args]
    return args[2] if len(args) > 2 else " ".join(args)


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{_program(p)} exited with {p.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the API at {url} was not ready after {timeout:.0f} s")


def start(host: str, port: int, *, log_dir: Path | None = None, quiet: bool = False) -> tuple[dict, list]:
    """Migrate, register the built-in model, start API + worker; returns (info, processes)."""
    from core.migrate import upgrade_head
    from core.permissions import make_private_dir, open_private_append, restrict_umask
    from core.settings import get_settings

    settings = get_settings()
    # Everything under SDPO_HOME is owner-only: this process and the API and worker it starts
    # create files 0600 and folders 0700 (core/permissions.py).
    restrict_umask()
    make_private_dir(settings.home)
    upgrade_head(settings.database_url)
    key = admin_key(settings)
    register_builtin_model(settings)
    env = {**os.environ, "SDPO_HOME": str(settings.home), "SDPO_ADMIN_KEY": key,
           "SDPO_DATABASE_URL": settings.database_url, "SDPO_BROKER_URL": settings.broker_url,
           "SDPO_STORAGE_DIR": str(settings.storage_dir)}
    # The worker never checks API keys: it gets neither the admin key nor the metrics token (only
    # production settings insist on an admin key in every process). Its training processes get an
    # allow-listed environment besides (worker/supervisor.py).
    worker_env = dict(env)
    if settings.environment != "production":
        worker_env.pop("SDPO_ADMIN_KEY", None)
    worker_env.pop("SDPO_METRICS_TOKEN", None)
    log_dir = make_private_dir(log_dir or settings.home / "logs")
    api_log = open_private_append(log_dir / "api.log")
    worker_log = open_private_append(log_dir / "worker.log")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", host,
                            "--port", str(port), "--log-level", "warning"], env=env, stdout=api_log,
                           stderr=subprocess.STDOUT)
    # One process takes both queues; -B runs the reaper's schedule in it.
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
                               f"{settings.train_queue},{settings.light_queue}", "--concurrency", "1", "-B",
                               "-s", str(settings.home / "celerybeat-schedule"), "--loglevel", "INFO",
                               "-n", f"sdpo-embedded-{port}@%h"], env=worker_env, stdout=worker_log,
                              stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    procs = [api, worker]
    try:
        wait_ready(url, procs)
    except BaseException:
        stop(procs)
        raise
    info = {"url": url, "api_pid": api.pid, "worker_pid": worker.pid, "home": str(settings.home)}
    service_file(settings).write_text(json.dumps(info))
    if not quiet:
        print(f"sDPO service on {url}  (docs: {url}/docs)")
        print(f"admin key: {key}")
        print(f"home: {settings.home}; logs: {log_dir}")
    return info, procs


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _up(args: argparse.Namespace) -> int:
    from core.settings import get_settings

    info, procs = start(args.host, args.port)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        stop(procs)
        service_file(get_settings()).unlink(missing_ok=True)
    dead = [p for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if dead and not stopping else 0


def register_up(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start the API and one worker (embedded: SQLite, no Redis needed)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(handler=_up)
