"""The Celery app of the worker: the same configuration as the API's producer, plus the tasks.

Start a worker:  celery -A worker.app worker -Q sdpo.train,sdpo.light --concurrency 1
(GPU hosts take `sdpo.train` only, one process per GPU; light hosts take `sdpo.light`.)
"""

from __future__ import annotations

import logging

from celery.signals import worker_init, worker_process_init, worker_ready

from core.celery_config import REAP
from core.permissions import restrict_umask
from core.queue import make_celery
from core.settings import get_settings
from core.webhooks import webhook_settings

# Owner-only files (core/permissions.py): checkpoints, chunks, logs, the beat schedule, and
# whatever the training processes (which inherit the umask) write.
restrict_umask()
settings = get_settings()
app = make_celery(settings, name="sdpo-worker")
app.conf.update(
    include=["worker.tasks"],
    # The reaper requeues steps whose worker died (their heartbeat went stale). Run by `celery beat`
    # (or `worker -B` in the embedded mode).
    beat_schedule={
        # It also re-sends the work of jobs whose message the broker lost. A tick that waited too
        # long behind other work expires: the next one does the same job.
        "reap-stale-steps": {"task": "sdpo.reap", "schedule": max(5.0, settings.step_stale_seconds / 4),
                             "options": {"expires": max(5.0, settings.step_stale_seconds / 4) * 4}},
        # Sends due webhook deliveries (worker.webhooks); an unclaimed tick expires instead of piling up.
        "deliver-webhooks": {"task": "sdpo.deliver_webhooks", "schedule": webhook_settings().dispatch_seconds,
                             "options": {"expires": webhook_settings().dispatch_seconds * 5}},
    },
    worker_hijack_root_logger=False,
)


@worker_init.connect
def _refuse_settings_this_host_cannot_train(sender=None, **_kwargs):
    # A training worker whose settings cannot train here (SDPO_ATTENTION=flex on a host without CUDA,
    # SDPO_DEVICE=cuda without one, flex without packing) stops now with the reason, instead of failing
    # every user's job at its first step. A light-only worker trains nothing: not checked.
    queues = set((sender.app if sender is not None else app).amqp.queues.consume_from or ())
    if queues and settings.train_queue not in queues:
        return
    from worker.checks import training_host_problem

    if problem := training_host_problem(settings):
        logging.getLogger(__name__).critical("this worker cannot train: %s", problem)
        raise SystemExit(f"sdpo worker: this host cannot train with its settings: {problem}")


@worker_process_init.connect
def _fresh_engine_after_fork(**_kwargs):
    # A database connection must never cross a fork: each pool process builds its own engine.
    from worker import db

    db.reset()


@worker_ready.connect
def _sweep_at_start_up(sender=None, **_kwargs):
    # The broker is not the truth: on start-up, requeue what died with a previous worker and
    # re-send what the broker lost (worker.flows.reap), in a task like any other.
    try:
        app.send_task(REAP, kwargs={"startup": True})
    except Exception:  # the broker is down: the periodic reap will do it
        logging.getLogger(__name__).warning("could not send the start-up reap", exc_info=True)
