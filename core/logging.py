"""JSON logs: one object per line, carrying the job and step of the work in progress, never a secret.

    {"ts": "2026-11-27T20:54:18.635Z", "level": "info", "logger": "worker.flows", "message": "...",
     "job_id": "ftjob-…", "step": 2}

- `job_id` / `step` come from `log_context()` (the API sets it per request from the URL, the worker
  per task from its arguments) or from `extra={"job_id": …, "step": …}` on one call.
- `redact()` runs over every message, argument and traceback: API keys (`sk-sdpo-…`), webhook
  secrets (`whsec_…`), bearer tokens and passwords inside URLs are replaced by `[redacted]`.
- `SDPO_LOG_FORMAT=text` keeps the plain format (for reading logs by eye); the default is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

job_id_var: ContextVar[str | None] = ContextVar("sdpo_log_job_id", default=None)
step_var: ContextVar[int | None] = ContextVar("sdpo_log_step", default=None)

_SECRETS = (
    (re.compile(r"sk-sdpo-[A-Za-z0-9_\-]+"), "sk-sdpo-[redacted]"),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_[redacted]"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+(\s+[^'\"\s,}]+)?"), r"\1[redacted]"),
    # user:password@ in URLs (database and broker URLs)
    (re.compile(r"(\w+://[^:/@\s]+:)[^@\s/]+@"), r"\1[redacted]@"),
)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def redact(text: str) -> str:
    """`text` with every secret-looking substring replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def log_context(job_id: str | None = None, step: int | None = None) -> Iterator[None]:
    """Attach a job (and step) to every log record made inside the block (this thread or task)."""
    job_token, step_token = job_id_var.set(job_id), step_var.set(step)
    try:
        yield
    finally:
        step_var.reset(step_token)
        job_id_var.reset(job_token)


def _jsonable(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        step = getattr(record, "step", None)
        step = step if step is not None else step_var.get()
        if job_id:
            out["job_id"] = job_id
        if step is not None:
            out["step"] = step
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = _jsonable(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def json_logs_enabled() -> bool:
    return os.environ.get("SDPO_LOG_FORMAT", "json").strip().lower() != "text"


def _use_json(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


def configure_logging() -> None:
    """JSON on stderr for the root logger and uvicorn's loggers (idempotent; a no-op with
    SDPO_LOG_FORMAT=text)."""
    if not json_logs_enabled():
        return
    root = logging.getLogger()
    # Only where nobody configured logging yet (uvicorn leaves the root alone; pytest or an
    # embedding program do not, and keep their setup).
    if not root.handlers:
        stderr_handler = logging.StreamHandler(sys.stderr)
        stderr_handler.setFormatter(JsonFormatter())
        root.addHandler(stderr_handler)
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())


def install_celery_logging() -> None:
    """Worker side: JSON formatters on Celery's handlers, and each task's job id and step index
    (its first two arguments, by the task contract) in the log context while it runs."""
    from celery import signals

    if not json_logs_enabled():
        return

    @signals.after_setup_logger.connect(weak=False)
    def _root(logger=None, **_kwargs):
        if logger is not None:
            _use_json(logger)

    @signals.after_setup_task_logger.connect(weak=False)
    def _task(logger=None, **_kwargs):
        if logger is not None:
            _use_json(logger)

    tokens: dict[str, tuple] = {}

    @signals.task_prerun.connect(weak=False)
    def _enter(task_id=None, args=None, **_kwargs):
        args = list(args or ())
        job_id = args[0] if args and isinstance(args[0], str) and args[0].startswith("ftjob-") else None
        step = args[1] if len(args) > 1 and isinstance(args[1], int) else None
        tokens[task_id] = (job_id_var.set(job_id), step_var.set(step))

    @signals.task_postrun.connect(weak=False)
    def _leave(task_id=None, **_kwargs):
        saved = tokens.pop(task_id, None)
        if saved is not None:
            step_var.reset(saved[1])
            job_id_var.reset(saved[0])
