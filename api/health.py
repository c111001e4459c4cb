"""Liveness and readiness."""

from __future__ import annotations

import concurrent.futures

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import AppServices, get_services
from core.db import read_only_session

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is up (no dependencies checked)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(services: AppServices) -> None:
    with read_only_session(services.session_factory) as session:  # no write lock for a probe (SQLite)
        session.execute(text("SELECT 1"))


def _check_broker(services: AppServices) -> None:
    with services.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=READY_TIMEOUT_S)


def _check_storage(services: AppServices) -> None:
    services.storage.check()  # an S3 store: HEAD on its bucket; the local folder: writable


@router.get("/readyz", summary="The database, the broker and the file store are reachable (503 otherwise)")
def readyz(services: AppServices = Depends(get_services)) -> JSONResponse:
    checks = {"database": _check_database, "broker": _check_broker, "storage": _check_storage}
    results: dict[str, str] = {}
    # Each check gets its own thread and a deadline, so a hung broker cannot hang the probe.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks))
    try:
        futures = {name: pool.submit(check, services) for name, check in checks.items()}
        for name, future in futures.items():
            try:
                future.result(timeout=READY_TIMEOUT_S + 0.5)
                results[name] = "ok"
            except concurrent.futures.TimeoutError:
                results[name] = "timeout"
            except Exception as exc:  # the reason, not a traceback: this endpoint is public
                results[name] = f"error: {type(exc).__name__}"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    ready = all(v == "ok" for v in results.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": results},
                        status_code=200 if ready else 503)
