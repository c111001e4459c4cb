"""Prometheus `/metrics`, and the request middleware that feeds it and the JSON logs.

The service's numbers are read from the database at scrape time, not counted in this process:
the database is the truth, several API replicas must agree, and the worker's work (step
durations, tokens/s) is visible without the worker exposing anything. Only the HTTP request
counters are per process (labelled by route template, never by id).

The endpoint carries aggregate counts only (no ids, owners, names or secrets), so by default it is
public like /healthz (Prometheus scrapes it from inside the deployment without an API key). Where
even the counts matter, set SDPO_METRICS_TOKEN: /metrics then wants `Authorization: Bearer TOKEN`
(Prometheus' `authorization` scrape setting), compared in constant time; API keys are not used
for it, so a scraper never holds a key that can read or train anything.

    sdpo_jobs{status}                     jobs by status
    sdpo_job_steps{status}                steps by status
    sdpo_queue_depth{queue}               jobs waiting to start ("jobs"); steps waiting for a worker ("steps")
    sdpo_step_duration_seconds            histogram of finished (succeeded) steps, started to finished
    sdpo_tokens_per_second                sum of the latest tokens/s of every running step
    sdpo_running_steps                    steps training now
    sdpo_checkpoint_cache_total{result}   steps whose initial checkpoint was in their worker's cache
                                          ("hit") or downloaded from the S3 store ("miss"): the
                                          `checkpoint_cache` field of the worker's step event
    sdpo_uploads_total, sdpo_upload_bytes_total   files ever uploaded (deleted ones included)
    sdpo_webhook_deliveries{status}       webhook outbox by status
    sdpo_http_requests_total{method,route,status}, sdpo_http_request_duration_seconds_sum/_count

The HTTP labels only take values from fixed sets, so requests (unauthenticated ones included)
cannot create new time series: `method` is one of the standard methods, `route` one of the app's
route templates, `status` a standard HTTP status code; anything else is `other`.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import AppServices, get_services
from api.files import repository as files_repository
from api.webhooks import repository as webhooks_repository
from core.db import read_only_session
from core.errors import AuthenticationError
from core.jobs import repository as jobs_repository
from core.logging import log_context
from core.states import JobStatus, StepStatus

router = APIRouter(tags=["health"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STEP_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_JOB_PATH = re.compile(r"^/v1/fine_tuning/jobs/(ftjob-[0-9a-f]+)")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class _Exposition:
    """Prometheus text format 0.0.4, written by hand (a few metric families need no library)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# ----------------------------------------------------------------------------------------------
# Per-process HTTP counters


class _HttpStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])

    def record(self, method: str, route: str, status: str, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            total = self.seconds[(method, route)]
            total[0] += seconds
            total[1] += 1


class ObserveRequests:
    """ASGI middleware: the request's job id in the log context (JSON logs), and HTTP counters.

    Pure ASGI rather than BaseHTTPMiddleware, so streamed responses (SSE, downloads) pass through
    untouched and the context variable is set in the task that runs the route."""

    def __init__(self, app: ASGIApp, stats: _HttpStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        match = _JOB_PATH.match(scope.get("path", ""))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with log_context(match.group(1) if match else None):
                await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # A template only when a route of this app matched (never the raw path); a request
            # that matched nothing, or a mounted app (static files), is `other`.
            template = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
            self.stats.record(_method_label(scope.get("method", "")), template or OTHER, _status_label(status),
                              time.perf_counter() - started)


OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUSES = frozenset(s.value for s in HTTPStatus)


def _method_label(method: str) -> str:
    return method if method in _METHODS else OTHER


def _status_label(status: int) -> str:
    return str(status) if status in _STATUSES else OTHER


# ----------------------------------------------------------------------------------------------
# Scrape


def _collect(db: Session, stats: _HttpStats) -> str:
    out = _Exposition()
    jobs = jobs_repository.count_jobs_by_status(db)
    out.family("sdpo_jobs", "gauge", "Fine-tuning jobs by status.",
               [("", {"status": s.value}, jobs.get(s.value, 0)) for s in JobStatus])
    steps = jobs_repository.count_steps_by_status(db)
    out.family("sdpo_job_steps", "gauge", "sDPO steps by status.",
               [("", {"status": s.value}, steps.get(s.value, 0)) for s in StepStatus])
    waiting_steps = jobs_repository.count_waiting_steps(db)
    out.family("sdpo_queue_depth", "gauge", "Work waiting for a worker: jobs not started, steps not claimed.",
               [("", {"queue": "jobs"}, jobs.get(JobStatus.QUEUED.value, 0)),
                ("", {"queue": "steps"}, waiting_steps)])

    durations = jobs_repository.succeeded_step_durations(db)
    samples = [("_bucket", {"le": str(b)}, sum(1 for d in durations if d <= b)) for b in STEP_BUCKETS]
    samples += [("_bucket", {"le": "+Inf"}, len(durations)), ("_sum", {}, round(sum(durations), 3)),
                ("_count", {}, len(durations))]
    out.family("sdpo_step_duration_seconds", "histogram", "Wall time of succeeded sDPO steps.", samples)

    running = jobs_repository.running_steps(db)
    current = set(running)
    tokens = 0.0
    for event in jobs_repository.latest_metrics_events(db, sorted({job_id for job_id, _ in current})).values():
        data = event.data or {}
        if (event.job_id, data.get("step")) in current and data.get("tokens_per_second"):
            tokens += float(data["tokens_per_second"])
    out.family("sdpo_running_steps", "gauge", "sDPO steps training now.", [("", {}, len(running))])
    out.family("sdpo_tokens_per_second", "gauge", "Training throughput: latest tokens/s summed over running steps.",
               [("", {}, round(tokens, 3))])

    cache = jobs_repository.count_checkpoint_cache_events(db)
    out.family("sdpo_checkpoint_cache_total", "counter",
               "Steps whose initial checkpoint was on their worker already (hit) or downloaded from the object "
               "store (miss); S3 store only.", [("", {"result": r}, cache.get(r, 0)) for r in ("hit", "miss")])

    count, size = files_repository.upload_totals(db)
    out.family("sdpo_uploads_total", "counter", "Preference files uploaded (deleted ones included).",
               [("", {}, count)])
    out.family("sdpo_upload_bytes_total", "counter", "Bytes of preference files uploaded.", [("", {}, size)])

    deliveries = webhooks_repository.count_deliveries_by_status(db)
    out.family("sdpo_webhook_deliveries", "gauge", "Webhook deliveries by status.",
               [("", {"status": s}, deliveries.get(s, 0)) for s in ("pending", "delivered", "failed")])

    with stats.lock:
        requests = sorted(stats.requests.items())
        seconds = sorted((k, list(v)) for k, v in stats.seconds.items())
    out.family("sdpo_http_requests_total", "counter", "HTTP requests served by this API process.",
               [("", {"method": m, "route": r, "status": s}, n) for (m, r, s), n in requests])
    out.family("sdpo_http_request_duration_seconds", "summary", "Time to serve HTTP requests (this process).",
               [item for (m, r), (total, n) in seconds
                for item in (("_sum", {"method": m, "route": r}, round(total, 6)),
                             ("_count", {"method": m, "route": r}, n))])
    return out.text()


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (aggregate counts only)")
def metrics(request: Request, services: AppServices = Depends(get_services)) -> PlainTextResponse:
    token = services.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AuthenticationError("/metrics needs `Authorization: Bearer <SDPO_METRICS_TOKEN>`.",
                                      code="invalid_metrics_token")
    stats = getattr(request.app.state, "http_stats", None) or _HttpStats()
    with read_only_session(services.session_factory) as session:
        body = _collect(session, stats)
    return PlainTextResponse(body, media_type=CONTENT_TYPE)


def install_metrics(app: FastAPI) -> None:
    """Add `/metrics` and the request middleware to `app`."""
    stats = _HttpStats()
    app.state.http_stats = stats
    app.add_middleware(ObserveRequests, stats=stats)
    app.include_router(router)
