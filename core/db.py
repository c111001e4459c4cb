"""Engine and session setup for Postgres and SQLite, and the after-commit / after-rollback hooks.

Rules this module makes easy to follow:

- The caller that owns the unit of work (an HTTP request, a worker task) commits; services only
  add and flush. `session_scope()` is that owner for scripts and tasks.
- Side effects outside the database (sending a Celery message, deleting a stored object) are
  registered with `after_commit()` / `after_rollback()` and run only once the outcome is known,
  so a rolled-back request never leaves a queued task or a deleted file behind.
- A worker process builds its own engine after fork (`make_engine` in the child); engines and
  sessions are never shared across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.permissions import create_private_file
from core.webhooks import install_outbox

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000

_AFTER_COMMIT = "sdpo_after_commit"
_AFTER_ROLLBACK = "sdpo_after_rollback"
# Execution option (and session.info key) of read-only sessions: see read_only_session().
READ_ONLY = "sdpo_read_only"


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for `url`, with the SQLite settings the embedded mode needs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            # Created owner-only before SQLite opens it (SQLite would make it 0644); its -wal and
            # -shm files take the database file's mode.
            create_private_file(Path(database).expanduser())
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer (API reads while the worker heartbeats).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        if conn.get_execution_options().get(READ_ONLY):
            # A reader takes no lock in WAL mode: it never waits for, nor holds up, a writer.
            conn.exec_driver_sql("BEGIN")
            return
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then
        # writes fails at once with SQLITE_BUSY (busy_timeout cannot help it) when another
        # writer committed in between; taking the lock first turns that into a short wait.
        # Such a transaction holds the one write lock of the database, so it must be short:
        # never open across a client's I/O (api/deps.py).
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_transient_db_error(exc: BaseException) -> bool:
    """True for errors that mean "the database is not reachable right now" (restarting, a dropped
    connection, a pool timeout, SQLite busy), as opposed to a bug or a refused statement: the
    worker retries these, and the API answers them with 503 instead of 500."""
    orig = getattr(exc, "orig", None)
    if orig is not None and type(orig).__module__.startswith("sqlite3"):
        # SQLite reports a missing table as an OperationalError too; only "locked"/"busy" pass.
        return "locked" in str(orig) or "busy" in str(orig)
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                        sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The session factory of a process (API, worker, CLI, tests), its sessions bound to `engine`.

    Its sessions write the webhook outbox with every job or step status change (installed here,
    explicitly, by `core.webhooks.install_outbox`): every process that changes a job gets its
    factory from this function.
    """
    # expire_on_commit=False: the API renders objects after the commit without reloading them.
    return install_outbox(sessionmaker(bind=engine, expire_on_commit=False))


def read_only_session(factory: sessionmaker[Session]) -> Session:
    """A session of `factory` for work that only reads (a key check, a GET, a stream's poll).

    On SQLite its transactions BEGIN DEFERRED: a snapshot read that takes no write lock, so a
    reader neither waits for the worker's writes nor delays them. Flushing a change from it raises
    RuntimeError (a programming error: writes belong in an ordinary session, which takes the write
    lock first). On Postgres it is an ordinary session.
    """
    # An option-engine shares the engine's pool, dialect and event listeners (a few µs to make).
    session = factory(bind=factory.kw["bind"].execution_options(**{READ_ONLY: True}))
    session.info[READ_ONLY] = True
    return session


@event.listens_for(Session, "before_flush")
def _refuse_writes_when_read_only(session: Session, _context, _instances) -> None:
    if session.info.get(READ_ONLY) and (session.new or session.dirty or session.deleted):
        raise RuntimeError("a read-only session (core.db.read_only_session) cannot write")


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        close_session(session)


def close_session(session: Session) -> None:
    """Close `session`, running the after-rollback callbacks of work that was never committed."""
    try:
        session.close()
    finally:
        _run(session, _AFTER_ROLLBACK)


# ----------------------------------------------------------------------------------------------
# After-commit / after-rollback callbacks, kept in session.info and run by session events.


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the session's outermost transaction has committed (dropped on rollback)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def after_rollback(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` if the work is rolled back or the session is closed without a commit
    (dropped on commit). Use it to undo a side effect that was done before the commit, such as a
    stored upload."""
    session.info.setdefault(_AFTER_ROLLBACK, []).append(callback)


def _run(session: Session, which: str) -> None:
    callbacks = session.info.pop(which, [])
    session.info.pop(_AFTER_COMMIT if which == _AFTER_ROLLBACK else _AFTER_ROLLBACK, None)
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one failing callback must not hide the others or the commit
            log.exception("%s callback failed", which)


@event.listens_for(Session, "after_commit")
def _session_committed(session: Session) -> None:
    # SQLAlchemy also fires after_commit when a SAVEPOINT is released; only the outermost commit
    # makes the work visible to others.
    if session.in_nested_transaction():
        return
    _run(session, _AFTER_COMMIT)


@event.listens_for(Session, "after_rollback")
def _session_rolled_back(session: Session) -> None:
    if session.in_nested_transaction():
        return
    _run(session, _AFTER_ROLLBACK)
