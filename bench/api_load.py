"""The API under concurrent load: latency of each endpoint as a ratio of /healthz's, and no 5xx.

    python bench/api_load.py                       # own server: embedded SQLite in a temp folder
    python bench/api_load.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test --redis redis://127.0.0.1:6379/13
    python bench/api_load.py --url http://127.0.0.1:8000 --key sk-sdpo-…   # a running server
    # issue #5's run: 200 clients for 60 s on Postgres + Redis with a worker training, then a 1 GB upload
    python bench/api_load.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test \
        --redis redis://127.0.0.1:6379/13 --worker --clients 200 --seconds 60 --upload-mb 1000

Starts uvicorn (unless --url) with a fresh store, a user key, a registered model and a small
uploaded file, then runs --clients concurrent clients for --seconds (bounded: at most 120 s and
--max-requests in all) over a mix of reads and writes a user's scripts and the SDK make:
list and read jobs, files, events and steps, upload a small file, create and cancel a job. The
baseline is GET /healthz (no database, no auth), measured in the same run by the same clients, so
each ratio says what the database, the auth check and the endpoint's work add. Traffic goes to
127.0.0.1 only. Exits 1 if any response was a 5xx, a transport error or an unexpected status,
else 0. Columns:
  n         requests sent to the endpoint
  err       responses that were not the expected status
  p50/p99   latency percentiles, in multiples of /healthz's p50 (lower is better)
  ms        the same p50 / p99 in milliseconds (absolute: only comparable on one machine at one time)
  rps       requests per second the endpoint got (all clients together)
With --worker a Celery worker runs beside the API (the registered model is then a real tiny model,
so the first job trains while the load runs). The server runs with SDPO_MAX_ACTIVE_JOBS_PER_OWNER=0:
the mix creates and cancels jobs from every client at once.

--upload-mb N then streams one N MB JSONL upload (generated on the fly, ~1 KB lines, chunked) and
samples the API process's resident memory every 20 ms: its peak against its size before the
upload, and the upload's MB/s (including the server's validation of every line).
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


class PeakRss:
    """The resident memory of process `pid`, sampled every `interval` seconds by a thread while the
    `with` block runs: `before` (bytes, at entry) and `peak` (bytes, the largest sample)."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self._process, self._interval, self._done = psutil.Process(pid), interval, threading.Event()
        self.before = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.Error:  # the process ended: its last sample stands
                return
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def start_server(home: Path, database_url: str | None, broker_url: str | None, *, worker: bool = False,
                 extra_env: dict[str, str | None] | None = None) -> tuple[str, str, list[subprocess.Popen]]:
    """uvicorn on a free port with a migrated database, a user key and a registered model (and a
    Celery worker on queues of its own, with `worker`). `extra_env` overrides the processes' environment
    (None removes a variable, e.g. SDPO_MAX_FILE_ROWS to keep the service's own row cap)."""
    from core.db import make_engine, make_session_factory, session_scope
    from core.keys import create_api_key
    from core.migrate import upgrade_head
    from core.models import RegisteredModel
    from core.settings import Settings

    # Only the URLs given: None is no longer a valid value (Settings derives the defaults from home).
    urls = {k: v for k, v in (("database_url", database_url), ("broker_url", broker_url)) if v}
    settings = Settings(home=home, admin_key="sk-sdpo-bench-" + secrets.token_hex(16), **urls)
    upgrade_head(settings.database_url)
    model_dir = home / "model"
    if worker:
        from sdpo_engine.tiny import build_tiny_model

        build_tiny_model(model_dir)
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text("{}")
    with session_scope(make_session_factory(make_engine(settings.database_url))) as s:
        if s.get(RegisteredModel, "bench-base") is None:
            s.add(RegisteredModel(id="bench-base", owner=None, source="local", uri=model_dir.as_uri(),
                                  default_hyperparameters={"learning_rate": 1e-3}))
        _row, key = create_api_key(s, name=f"bench-{secrets.token_hex(3)}", owner="bench")
    port = _free_port()
    tag = secrets.token_hex(4)  # queues of its own: a shared Redis never mixes this run with another
    env = {**os.environ, "SDPO_HOME": str(home), "SDPO_DATABASE_URL": settings.database_url,
           "SDPO_BROKER_URL": settings.broker_url, "SDPO_ADMIN_KEY": settings.admin_key,
           "SDPO_LIGHT_QUEUE": f"bench-light-{tag}", "SDPO_TRAIN_QUEUE": f"bench-train-{tag}",
           "SDPO_MAX_ACTIVE_JOBS_PER_OWNER": "0", "SDPO_MAX_FILE_ROWS": str(10**7)}
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    procs = [subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
                               "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                              stdout=open(home / "api.log", "ab"), stderr=subprocess.STDOUT)]
    if worker:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q",
             f"bench-train-{tag},bench-light-{tag}", "--concurrency", "1", "--loglevel", "WARNING",
             "-n", f"bench-{tag}@%h"], env=env, cwd=ROOT,
            stdout=open(home / "worker.log", "ab"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return url, key, procs
        except httpx.HTTPError:
            time.sleep(0.2)
    for proc in procs:
        proc.kill()
    raise RuntimeError(f"the API did not start; see {home / 'api.log'}")


def big_upload(url: str, key: str, api_pid: int, megabytes: int) -> dict:
    """Stream one `megabytes` MB upload (valid ~1 KB lines, chunked transfer) while sampling the
    API process's RSS; the file is deleted afterwards."""
    boundary = "sdpo-bench-" + secrets.token_hex(8)
    filler = "x" * 900
    target = megabytes * 1_000_000

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/jsonl\r\n\r\n").encode()
        sent, i, lines = 0, 0, []
        while sent < target:
            line = json.dumps({"prompt": f"{filler} {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}) + "\n"
            lines.append(line)
            sent += len(line)
            i += 1
            if len(lines) == 1024:
                yield "".join(lines).encode()
                lines = []
        if lines:
            yield "".join(lines).encode()
        yield f"\r\n--{boundary}--\r\n".encode()

    with PeakRss(api_pid) as rss:
        started = time.perf_counter()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as c:
            response = c.post("/v1/files", content=body(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            seconds = time.perf_counter() - started
            if response.status_code == 200:
                c.delete(f"/v1/files/{response.json()['id']}")
    return {"status": response.status_code, "error": None if response.status_code == 200 else response.text[:300],
            "bytes": target, "seconds": seconds, "rss_before": rss.before, "rss_peak": rss.peak,
            "rows": response.json().get("rows") if response.status_code == 200 else None}


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
    p.add_argument("--worker", action="store_true", help="run a Celery worker beside the API (own server only)")
    p.add_argument("--upload-mb", type=int, default=0, help="then stream one upload of this many MB (own server)")
    args = p.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)

    procs, home, upload = [], None, None
    if args.url:
        if not args.url.startswith(("http://127.", "http://localhost")) or not args.key:
            p.error("--url must be a server on this machine, with --key")
        if args.worker or args.upload_mb:
            p.error("--worker and --upload-mb need the benchmark's own server (no --url)")
        url, key = args.url, args.key
    else:
        home = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
        url, key, procs = start_server(home, args.postgres, args.redis, worker=args.worker)
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
        if args.upload_mb:
            upload = big_upload(url, key, procs[0].pid, args.upload_mb)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(load.samples["GET /healthz"])
    everything = [v for values in load.samples.values() for v in values]
    print(f"{args.clients} clients, {wall:.1f} s, {load.sent} requests ({load.sent / wall:.0f}/s), "
          f"all requests p50 {statistics.median(everything) * 1e3:.0f} ms, p99 {_pct(everything, 0.99) * 1e3:.0f} ms; "
          f"{'with' if args.worker else 'no'} worker; baseline GET /healthz p50 = 1.0 "
          f"({base * 1e3:.1f} ms)")
    print(f"{'endpoint':28} {'n':>6} {'err':>5} {'p50':>7} {'p99':>7} {'ms p50/p99':>14} {'rps':>7}")
    for name in sorted(load.samples, key=lambda n: statistics.median(load.samples[n])):
        values = load.samples[name]
        ms = f"{statistics.median(values) * 1e3:.0f}/{_pct(values, 0.99) * 1e3:.0f}"
        print(f"{name:28} {len(values):6d} {load.errors[name]:5d} {statistics.median(values) / base:7.1f} "
              f"{_pct(values, 0.99) / base:7.1f} {ms:>14} {len(values) / wall:7.1f}")
    failed = False
    unexpected = sum(load.errors.values())
    if load.server_errors:
        print(f"\n{len(load.server_errors)} server errors or transport failures, e.g.:")
        for line in load.server_errors[:10]:
            print("  " + line)
        failed = True
    elif unexpected:
        print(f"\n{unexpected} responses with an unexpected status (no 5xx)")
        failed = True
    else:
        print("\nzero errors: no 5xx, no transport failure, every status as expected")
    if upload is not None:
        mb = 1 << 20
        print(f"\nupload of {upload['bytes'] / 1e6:.0f} MB ({upload['rows']} rows): status {upload['status']}, "
              f"{upload['seconds']:.1f} s ({upload['bytes'] / 1e6 / upload['seconds']:.1f} MB/s, validation included); "
              f"API RSS {upload['rss_before'] / mb:.0f} MiB before, peak {upload['rss_peak'] / mb:.0f} MiB "
              f"(+{(upload['rss_peak'] - upload['rss_before']) / mb:.0f} MiB, "
              f"{(upload['rss_peak'] - upload['rss_before']) / upload['bytes']:.4f} of the upload's size)")
        if upload["status"] != 200:
            print(f"  upload failed: {upload['error']}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
