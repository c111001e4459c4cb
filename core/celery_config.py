"""Celery configuration shared by the API's producer and the worker, so both route and
serialise the same way. Task names are strings: the API never imports the worker's code.
"""

from __future__ import annotations

from typing import Any

from core.settings import Settings

PREPARE_JOB = "sdpo.prepare_job"  # (job_id): build the chunks, move the job to running
RUN_STEP = "sdpo.run_step"  # (job_id, index): claim and train one step in a child process
FINALIZE_JOB = "sdpo.finalize_job"  # (job_id): mark succeeded, register the fine-tuned model
REAP = "sdpo.reap"  # (): periodic; requeue steps whose worker died
# (job_id): a job ended outside a worker's step (a cancel while no step ran): its stored trainer state
# is discarded and its integrations' runs are closed (worker/flows.py: end_job)
JOB_ENDED = "sdpo.job_ended"


def _transport_options(settings: Settings) -> dict[str, Any]:
    # Redis redelivers an unacked task after the visibility timeout, so it must outlast the
    # longest step. Only Redis gets it: kombu's SQLAlchemy transport passes its transport options
    # to create_engine(), which refuses unknown keywords.
    if str(settings.broker_url).startswith(("redis://", "rediss://", "sentinel://")):
        return {"visibility_timeout": settings.broker_visibility_timeout}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    light, train = settings.light_queue, settings.train_queue
    return {
        "broker_url": settings.broker_url,
        # The database is the truth about jobs; Celery only carries messages.
        "task_ignore_result": True,
        "result_backend": None,
        # A task is acknowledged only when it finishes, so a worker that dies mid-step has its
        # message redelivered (Redis: after the visibility timeout) and the claim makes that safe.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": light,
        "task_routes": {
            RUN_STEP: {"queue": train},
            PREPARE_JOB: {"queue": light},
            FINALIZE_JOB: {"queue": light},
            REAP: {"queue": light},
            JOB_ENDED: {"queue": light},
        },
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "timezone": "UTC",
        "enable_utc": True,
    }
