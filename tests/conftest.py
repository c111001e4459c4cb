"""Shared fixtures: real Postgres and Redis, settings, app clients, keys and preference files.

Services are never faked and never skipped: a test that needs Postgres or Redis fails when they
are unreachable (CI runs both). URLs come from:

- SDPO_TEST_DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test): a server
  where the tests may CREATE DATABASE. Each session makes its own `sdpo_test_<random>` database,
  migrates it with `alembic upgrade head`, and drops it at the end.
- SDPO_TEST_REDIS_URL (default redis://127.0.0.1:6379/15): the broker; flushed by `clean_state`.

Nothing here is autouse: packages that need neither database nor broker (tests/engine) pay for
nothing. A package that does opts in with an autouse fixture requesting `clean_state`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

from core.db import make_engine, make_session_factory, session_scope
from core.keys import create_api_key, ensure_settings_admin_key
from core.migrate import upgrade_head
from core.models import Base, RegisteredModel
from core.settings import Settings

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"
# Kept across tests so that session-scoped keys (and a live server's admin key) stay valid.
KEPT_TABLES = ("api_keys",)

# ------------------------------------------------------------------------------------------------
# Postgres


def _libpq_url(sqlalchemy_url: str, database: str | None = None) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def create_postgres_database(server_url: str, prefix: str = "sdpo_test") -> str:
    """Create an empty database on the server of `server_url`; return its SQLAlchemy URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq_url(server_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    parsed = make_url(url)
    maintenance = _libpq_url(url, database="postgres")
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The configured Postgres URL (its database is only used to connect and CREATE DATABASE)."""
    return os.environ.get("SDPO_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh Postgres database for this test session, migrated to head; dropped at the end."""
    url = create_postgres_database(postgres_server_url)
    try:
        upgrade_head(url)
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="session")
def db_engine(database_url: str):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def session_factory(db_engine):
    return make_session_factory(db_engine)


@pytest.fixture
def db(session_factory) -> Iterator:
    """A session for tests to insert rows and look at what the API wrote (commit yourself)."""
    session = session_factory()
    try:
        yield session
    finally:
        session.close()


def table_counts(session) -> dict[str, int]:
    """Rows per table: compare before and after a refused request to prove nothing was written."""
    session.rollback()  # a fresh snapshot
    return {t.name: session.execute(text(f'SELECT count(*) FROM "{t.name}"')).scalar_one()
            for t in Base.metadata.sorted_tables}


@pytest.fixture
def count_rows(db) -> Callable[[], dict[str, int]]:
    return lambda: table_counts(db)


# ------------------------------------------------------------------------------------------------
# Redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("SDPO_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    client.ping()  # fail (not skip) when Redis is not there
    client.close()
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url=redis_url)
    yield client
    client.close()


def queued_messages(client: redis.Redis, queue: str) -> list[dict]:
    """The Celery messages waiting in a Redis queue (kombu keeps each queue as a list)."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real S3-protocol server (moto's standalone server) in its own process over HTTP, for the
    S3 store's tests (tests/s3server.py); each test makes its own bucket (`moto_server.new_bucket()`)."""
    from tests.s3server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------
# Settings, state and keys


@pytest.fixture(scope="session")
def sdpo_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdpo_home")


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, sdpo_home: Path) -> Settings:
    """Settings for the session: the test database, Redis as broker, storage under a temp home."""
    return Settings(
        home=sdpo_home,
        database_url=database_url,
        broker_url=redis_url,
        storage_dir=sdpo_home / "storage",
        admin_key="sk-sdpo-test-admin-" + secrets.token_hex(16),
        environment="development",
        model_roots=[],
        # Queue names of their own: several test runs may share one Redis database on a
        # developer's machine, and must not see each other's messages.
        light_queue=f"sdpo.light.test-{secrets.token_hex(4)}",
        train_queue=f"sdpo.train.test-{secrets.token_hex(4)}",
    )


@pytest.fixture
def clean_state(db_engine, redis_url: str, settings: Settings) -> Iterator[None]:
    """Empty tables (but api_keys), an empty Redis test db and an empty store before a test."""
    names = [t.name for t in Base.metadata.sorted_tables if t.name not in KEPT_TABLES]
    with db_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    storage = Path(settings.storage_dir)
    if storage.exists():
        for child in storage.iterdir():
            if child.name != ".tmp":
                _remove(child)
    yield


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def stored_objects(settings: Settings) -> list[Path]:
    """Every file in the store (temp area included): proves a refused upload left nothing."""
    root = Path(settings.storage_dir)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="session")
def admin_key(settings: Settings, session_factory) -> str:
    """The SDPO_ADMIN_KEY of `settings`, registered (owner "admin", admin rights)."""
    with session_scope(session_factory) as session:
        ensure_settings_admin_key(session, settings.admin_key)
    return settings.admin_key


def _make_key(session_factory, owner: str) -> str:
    with session_scope(session_factory) as session:
        _row, plaintext = create_api_key(session, name=f"test-{owner}", owner=owner)
    return plaintext


@pytest.fixture(scope="session")
def user_key(session_factory) -> str:
    """A normal key of owner "alice"."""
    return _make_key(session_factory, "alice")


@pytest.fixture(scope="session")
def other_key(session_factory) -> str:
    """A normal key of a second owner, "bob", for isolation tests."""
    return _make_key(session_factory, "bob")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------------
# Apps and servers


@pytest.fixture
def make_client(settings: Settings):
    """Factory: a TestClient (lifespan run) for an app with `settings` changed by `overrides`."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    clients = []

    def make(**overrides):
        app = create_app(settings.model_copy(update=overrides) if overrides else settings)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    """An in-process client for the app built from `settings` (errors come back as responses)."""
    return make_client()


class LiveServer:
    """uvicorn serving `create_app(settings)` on a free 127.0.0.1 port, in a thread."""

    def __init__(self, settings: Settings):
        import uvicorn

        from api.main import create_app

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture(scope="session")
def live_server(settings: Settings, admin_key: str) -> Iterator[str]:
    """A real uvicorn server for `settings` (shared by the session); yields its base URL."""
    server = LiveServer(settings).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def make_live_server(settings: Settings):
    """Factory: a real server for `settings` changed by `overrides`; stopped after the test."""
    servers = []

    def make(**overrides) -> str:
        server = LiveServer(settings.model_copy(update=overrides)).start()
        servers.append(server)
        return server.url

    yield make
    for server in servers:
        server.stop()


# ------------------------------------------------------------------------------------------------
# Models and data


@pytest.fixture
def base_model(db, tmp_path) -> RegisteredModel:
    """A system model "tiny-base" (an HF-looking directory; nothing loads it in API tests) whose
    default learning rate is the tiny model's 1e-3."""
    path = tmp_path / "tiny-base"
    path.mkdir()
    (path / "config.json").write_text("{}")
    row = RegisteredModel(id="tiny-base", owner=None, source="local", uri=path.as_uri(),
                          default_hyperparameters={"learning_rate": 1e-3})
    db.add(row)
    db.commit()
    return row


FORMATS = ("standard", "conversational", "openai")


def preference_rows(n: int = 10, fmt: str = "standard", sources: tuple[str, ...] = ("easy", "hard"),
                    start: int = 0) -> list[dict]:
    """`n` valid pairs in one of the three accepted formats, cycling through `sources`
    (an empty tuple gives rows without a source)."""
    rows = []
    for i in range(start, start + n):
        prompt, chosen, rejected = f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.", f"{i} + {i} = {2 * i + 1}."
        if fmt == "standard":
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        elif fmt == "conversational":
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
        elif fmt == "openai":
            row = {"input": {"messages": [{"role": "user", "content": prompt}]},
                   "preferred_output": [{"role": "assistant", "content": chosen}],
                   "non_preferred_output": [{"role": "assistant", "content": rejected}]}
        else:
            raise ValueError(fmt)
        if sources:
            row["source"] = sources[i % len(sources)]
        rows.append(row)
    return rows


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., Path]:
    """Factory: write preference rows (see `preference_rows`) to a .jsonl file; return its path."""
    counter = iter(range(10**6))

    def write(rows: list[dict] | None = None, name: str | None = None, **kwargs) -> Path:
        path = tmp_path / (name or f"pairs-{next(counter)}.jsonl")
        path.write_bytes(jsonl_bytes(rows if rows is not None else preference_rows(**kwargs)))
        return path

    return write


@pytest.fixture
def upload(client) -> Callable[..., dict]:
    """Factory: upload rows through the API with a key; return the file object (asserts 200)."""

    def do(key: str, rows: list[dict] | None = None, filename: str = "pairs.jsonl", **kwargs) -> dict:
        content = jsonl_bytes(rows if rows is not None else preference_rows(**kwargs))
        response = client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                               files={"file": (filename, content, "application/jsonl")})
        assert response.status_code == 200, response.text
        return response.json()

    return do


@pytest.fixture(params=["postgres", "sqlite"])
def old_database(request, tmp_path, postgres_server_url) -> Iterator[str]:
    """An empty database on Postgres and on SQLite, for data-migration tests that upgrade it to an
    older revision, write rows as that version did, then upgrade to head."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    url = create_postgres_database(postgres_server_url, prefix="sdpo_migration")
    yield url
    drop_postgres_database(url)
