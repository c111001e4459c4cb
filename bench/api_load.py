"""The API under concurrent load: latency of each endpoint as a ratio of /healthz's, and no 5xx.

    python bench/api_load.py                       # own server: embedded SQLite in a temp folder
    python bench/api_load.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test --redis redis://127.0.0.1:6379/13
    python bench/api_load.py --url http://127.0.0.1:8000 --key sk-sdpo-…   # a running server

Starts uvicorn (unless --url) with a fresh store, a user key, a registered model and a small
uploaded file, then runs --clients concurrent clients for --seconds (bounded: at most 120 s and
--max-requests in all) over a mix of reads and writes a user's scripts and the SDK make:
list and read jobs, files, events and steps, upload a small file, create and cancel a job. The
baseline is GET /healthz (no database, no auth), measured in the same run by the same clients, so
each ratio says what the database, the auth check and the endpoint's work add. Traffic goes to
127.0.0.1 only. Exits 1 if any response was a 5xx (or a transport error), else 0. Columns:
  n         requests sent to the endpoint
  err       responses that were not the expected status
  p50/p99   latency percentiles, in multiples of /healthz's p50 (lower is better)
  rps       requests per second the endpoint got (all clients together)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(n: int, start: int) -> bytes:
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
            for i in range(start, start + n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def start_server(home: Path, database_url: str | None, broker_url: str | None) -> tuple[str, str, subprocess.Popen]:
    """uvicorn on a free port with a migrated database, a user key and a registered model."""
    from core.db import make_engine, make_session_factory, session_scope
    from core.keys import create_api_key
    from core.migrate import upgrade_head
    from core.models import RegisteredModel
    from core.settings import Settings

    settings = Settings(home=home, database_url=database_url, broker_url=broker_url,
                        admin_key="sk-sdpo-bench-" + secrets.token_hex(16))
    upgrade_head(settings.database_url)
    model_dir = home / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    with session_scope(make_session_factory(make_engine(settings.database_url))) as s:
        if s.get(RegisteredModel, "bench-base") is None:
            s.add(RegisteredModel(id="bench-base", owner=None, source="local", uri=model_dir.as_uri(),
                                  default_hyperparameters={"learning_rate": 1e-3}))
        _row, key = create_api_key(s, name=f"bench-{secrets.token_hex(3)}", owner="bench")
    port = _free_port()
    env = {**os.environ, "SDPO_HOME": str(home), "SDPO_DATABASE_URL": settings.database_url,
           "SDPO_BROKER_URL": settings.broker_url, "SDPO_ADMIN_KEY": settings.admin_key}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                            stdout=open(home / "api.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return url, key, proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the API did not start; see {home / 'api.log'}")


class Load:
    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.server_errors: list[str] = []
        self.lock = threading.Lock()
        self.sent = 0

    def prepare(self) -> dict:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as c:
            file_id = c.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("seed.jsonl", _pairs(8, 0), "application/jsonl")}).json()["id"]
            job = c.post("/v1/fine_tuning/jobs", json={"model": "bench-base", "training_file": file_id})
            if job.status_code != 200:
                raise RuntimeError(f"cannot create a job to read: {job.text} (is the model registered?)")
            return {"file": file_id, "job": job.json()["id"]}

    def _call(self, client: httpx.Client, name: str, method: str, path: str, expect: int = 200, **kwargs):
        started = time.perf_counter()
        try:
            response = client.request(method, path, **kwargs)
            status = response.status_code
        except httpx.HTTPError as exc:
            status, response = 599, None
            with self.lock:
                self.server_errors.append(f"{name}: {type(exc).__name__}")
        elapsed = time.perf_counter() - started
        with self.lock:
            self.sent += 1
            self.samples[name].append(elapsed)
            if status != expect:
                self.errors[name] += 1
            if status >= 500 and response is not None:
                self.server_errors.append(f"{name}: {status} {response.text[:200]}")
        return response

    def client_loop(self, seed: int, ctx: dict, until: float, max_requests: int) -> None:
        rng = random.Random(seed)
        job = f"/v1/fine_tuning/jobs/{ctx['job']}"
        mix = [
            (30, "GET /healthz", lambda c: self._call(c, "GET /healthz", "GET", "/healthz")),
            (15, "GET /v1/fine_tuning/jobs", lambda c: self._call(c, "GET /v1/fine_tuning/jobs", "GET",
                                                                  "/v1/fine_tuning/jobs", params={"limit": 20})),
            (10, "GET job", lambda c: self._call(c, "GET job", "GET", job)),
            (10, "GET events", lambda c: self._call(c, "GET events", "GET", job + "/events")),
            (5, "GET steps", lambda c: self._call(c, "GET steps", "GET", job + "/steps")),
            (10, "GET /v1/files", lambda c: self._call(c, "GET /v1/files", "GET", "/v1/files", params={"limit": 20})),
            (5, "GET /v1/models", lambda c: self._call(c, "GET /v1/models", "GET", "/v1/models")),
            (5, "POST /v1/files", lambda c: self._call(
                c, "POST /v1/files", "POST", "/v1/files", data={"purpose": "fine-tune"},
                files={"file": ("x.jsonl", _pairs(20, rng.randrange(10**6)), "application/jsonl")})),
            (5, "POST + cancel job", self._create_and_cancel(ctx)),
            (5, "bad request (400)", lambda c: self._call(c, "bad request (400)", "POST", "/v1/fine_tuning/jobs",
                                                          expect=400, json={"model": 5})),
        ]
        weights = [w for w, _n, _f in mix]
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as c:
            while time.monotonic() < until and self.sent < max_requests:
                _w, _name, call = rng.choices(mix, weights=weights)[0]
                call(c)

    def _create_and_cancel(self, ctx: dict):
        def run(c: httpx.Client):
            r = self._call(c, "POST job", "POST", "/v1/fine_tuning/jobs",
                           json={"model": "bench-base", "training_file": ctx["file"]})
            if r is not None and r.status_code == 200:
                self._call(c, "POST cancel", "POST", f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")
        return run


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (127.0.0.1 only); needs --key and a registered 'bench-base'")
    p.add_argument("--key")
    p.add_argument("--postgres", help="SQLAlchemy URL of a database to migrate and use (default: SQLite)")
    p.add_argument("--redis", help="broker URL (default: the embedded SQLite broker)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)

    proc, home = None, None
    if args.url:
        if not args.url.startswith(("http://127.", "http://localhost")) or not args.key:
            p.error("--url must be a server on this machine, with --key")
        url, key = args.url, args.key
    else:
        home = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
        url, key, proc = start_server(home, args.postgres, args.redis)
    try:
        load = Load(url, key)
        ctx = load.prepare()
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=load.client_loop, args=(args.seed + i, ctx, until, args.max_requests))
                   for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(load.samples["GET /healthz"])
    print(f"{args.clients} clients, {wall:.1f} s, {load.sent} requests ({load.sent / wall:.0f}/s); "
          f"baseline GET /healthz p50 = 1.0")
    print(f"{'endpoint':28} {'n':>6} {'err':>5} {'p50':>7} {'p99':>7} {'rps':>7}")
    for name in sorted(load.samples, key=lambda n: statistics.median(load.samples[n])):
        values = load.samples[name]
        print(f"{name:28} {len(values):6d} {load.errors[name]:5d} {statistics.median(values) / base:7.1f} "
              f"{_pct(values, 0.99) / base:7.1f} {len(values) / wall:7.1f}")
    if load.server_errors:
        print(f"\n{len(load.server_errors)} server errors or transport failures, e.g.:")
        for line in load.server_errors[:10]:
            print("  " + line)
        return 1
    print("\nno 5xx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
