"""The queue boundary: a producer-only Celery app and sending tasks after the commit.

The API sends tasks by name (`core.celery_config`), never by importing the worker. A job's
whole run is one message: the chain prepare_job | run_step(1) | … | run_step(T) | finalize_job,
built from immutable signatures (each task takes ids only and ignores its parent's result).
Messages are sent from an `after_commit` hook: if the transaction rolls back nothing is sent,
and a worker that receives a message always finds the rows it names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from celery import Celery, chain
from celery.canvas import Signature
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core import kombu_patches
from core.celery_config import FINALIZE_JOB, PREPARE_JOB, RUN_STEP, celery_config
from core.db import after_commit
from core.permissions import create_private_file
from core.settings import Settings

log = logging.getLogger(__name__)


def make_celery(settings: Settings, *, name: str = "sdpo") -> Celery:
    """A Celery app configured from settings. The API uses it only to send."""
    kombu_patches.install()  # the embedded broker's polling interval (core/kombu_patches.py)
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    broker_url = str(settings.broker_url)
    if broker_url.startswith("sqla+sqlite:///"):
        # The embedded broker's file holds every task's arguments: owner-only, like the database.
        database = make_url(broker_url.removeprefix("sqla+")).database
        if database and database != ":memory:":
            create_private_file(Path(database).expanduser())
    return app


def job_chain(app: Celery, job_id: str, step_indexes: Sequence[int]) -> Signature:
    """prepare_job | run_step(job, k) for k in step_indexes | finalize_job, by task name."""
    signatures = [app.signature(PREPARE_JOB, args=(job_id,), immutable=True)]
    signatures += [app.signature(RUN_STEP, args=(job_id, int(k)), immutable=True) for k in step_indexes]
    signatures.append(app.signature(FINALIZE_JOB, args=(job_id,), immutable=True))
    return chain(*signatures)


def enqueue_after_commit(session: Session, signature: Signature) -> None:
    """Send `signature` once `session` commits; forget it if it rolls back.

    A send that fails after the commit is logged, not raised: the job row is already committed
    in `queued`, and the worker re-enqueues queued work it finds at start-up (the broker is not
    the truth).
    """

    def send() -> None:
        try:
            signature.apply_async()
        except Exception:
            log.exception("could not send %s after commit; the worker's start-up sweep will", signature)

    after_commit(session, send)
