"""The Celery app of the worker: the same configuration as the API's producer, plus the tasks.

Start a worker:  celery -A worker.app worker -Q sdpo.train,sdpo.light --concurrency 1
(GPU hosts take `sdpo.train` only, one process per GPU; light hosts take `sdpo.light`.)
"""

from __future__ import annotations

from celery.signals import worker_process_init

from core.queue import make_celery
from core.settings import get_settings

settings = get_settings()
app = make_celery(settings, name="sdpo-worker")
app.conf.update(
    include=["worker.tasks"],
    # The reaper requeues steps whose worker died (their heartbeat went stale). Run by `celery beat`
    # (or `worker -B` in the embedded mode).
    beat_schedule={
        "reap-stale-steps": {"task": "sdpo.reap", "schedule": max(5.0, settings.step_stale_seconds / 4)},
    },
    worker_hijack_root_logger=False,
)


@worker_process_init.connect
def _fresh_engine_after_fork(**_kwargs):
    # A database connection must never cross a fork: each pool process builds its own engine.
    from worker import db

    db.reset()
