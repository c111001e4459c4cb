"""Webhook tests: a local receiver that checks signatures, and the e2e service fixture."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from core.webhooks import InvalidSignature, verify_signature
from tests.conftest import create_postgres_database, drop_postgres_database
from tests.e2e.conftest import Service

WEBHOOKS_REDIS_DB = 12  # e2e uses 14, the API tests 15: services of different suites never share a queue


_tiny_model: Path | None = None


@pytest.fixture
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny model, built once per session for tests/webhooks, tests/cli and tests/ui
    together (a fixture imported into several conftests would be built once per folder)."""
    global _tiny_model
    if _tiny_model is None:
        from sdpo_engine.tiny import build_tiny_model

        _tiny_model = build_tiny_model(tmp_path_factory.mktemp("svc-models") / "sdpo-tiny")
    return _tiny_model


def started_service(tmp_path, postgres_server_url: str, redis_url: str, tiny_model: Path, redis_db: int,
                    extra_env: dict[str, str] | None = None) -> Iterator[Service]:
    """tests/e2e's Service (uvicorn + Celery on a fresh Postgres database) on a Redis database of
    its own, so that it never shares a queue with another suite's service on the same machine."""
    database_url = create_postgres_database(postgres_server_url, prefix="sdpo_svc")
    broker_url = redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
    r = redis.Redis.from_url(broker_url)
    r.flushdb()
    r.close()
    home = tmp_path / "home"
    home.mkdir()
    svc = Service(home, database_url, broker_url, tiny_model)
    # The tests' receivers listen on loopback, which webhooks reach only where the admin allows it.
    svc.env["SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS"] = "127.0.0.1"
    svc.env.update(extra_env or {})
    try:
        yield svc
    finally:
        svc.stop()
        drop_postgres_database(database_url)


def start_worker_with_beat(service: Service, name: str, *, train: bool = False) -> subprocess.Popen:
    """A worker that also runs the beat schedule (webhook dispatch, reaper): the light queue, and
    with `train` the training queue too (like `sdpo up`'s one worker)."""
    light = service.env.get("SDPO_LIGHT_QUEUE", "sdpo.light")
    queues = f"{service.env.get('SDPO_TRAIN_QUEUE', 'sdpo.train')},{light}" if train else light
    log_path = service.home / f"worker-{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, "-B",
                             "-s", str(service.home / f"beat-{name}"), "--concurrency", "1", "-n", f"{name}@%h",
                             "--loglevel", "INFO"], env=service.env, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT)
    service.procs.append(proc)
    service.workers.append(proc)
    service._wait(lambda: "ready" in log_path.read_text(), proc, f"worker {name}")
    return proc


@pytest.fixture
def service(tmp_path, postgres_server_url, redis_url, tiny_model):
    yield from started_service(tmp_path, postgres_server_url, redis_url, tiny_model, WEBHOOKS_REDIS_DB)


class Receiver:
    """An HTTP server on 127.0.0.1 that accepts a POST only when it is signed with the secret it
    was given for that path (401 otherwise), and records every request."""

    def __init__(self):
        self.secrets: dict[str, str] = {}
        self.fail_first: set[str] = set()  # paths whose first request gets a 503
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    seen = [r for r in receiver.requests if r["path"] == self.path]
                    entry = {"path": self.path, "at": time.monotonic(), "headers": dict(self.headers), "body": body}
                    try:
                        verify_signature(receiver.secrets.get(self.path, "whsec_AAAA"), self.headers, body)
                        entry["verdict"] = "ok"
                        status = 503 if (self.path in receiver.fail_first and not seen) else 200
                    except InvalidSignature as exc:
                        entry["verdict"] = f"rejected: {exc}"
                        status = 401
                    entry["status"] = status
                    receiver.requests.append(entry)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"no")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self, path: str) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests if r["path"] == path and r["status"] == 200]

    def on(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


class Listener:
    """A bare HTTP/1.1 listener on `host` that counts every TCP connection it accepts (so a test can
    prove that none was made) and answers each request with `status` and a body that must never
    reach a webhook's owner. Optionally TLS (`ssl_context`), recording the SNI name sent."""

    SECRET_REPLY = b"internal-reply: root:x:0:0 do-not-leak"

    def __init__(self, host: str = "127.0.0.1", *, ssl_context=None, statuses: dict[str, int] | None = None,
                 redirects: dict[str, str] | None = None):
        import socket

        self.connections = 0
        self.requests: list[dict] = []
        self.server_names: list[str | None] = []
        self.statuses = statuses or {}
        self.redirects = redirects or {}  # path -> Location of a 307 answer
        self.lock = threading.Lock()
        self.ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        try:
            conn.settimeout(5)
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            stream = conn.makefile("rb")
            request_line = stream.readline().decode("latin-1").strip()
            headers = {}
            while (line := stream.readline().decode("latin-1").strip()):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = stream.read(int(headers.get("content-length") or 0))
            method, path, _ = request_line.split(" ", 2)
            with self.lock:
                self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
            status = 307 if path in self.redirects else self.statuses.get(path, 200)
            location = f"location: {self.redirects[path]}\r\n" if path in self.redirects else ""
            conn.sendall(f"HTTP/1.1 {status} X\r\ncontent-length: {len(self.SECRET_REPLY)}\r\n{location}"
                         f"connection: close\r\n\r\n".encode() + self.SECRET_REPLY)
        except Exception:  # noqa: BLE001 (a failed handshake is what some tests provoke)
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()
