"""Celery tasks: thin wrappers that call the flows by id, with the worker's one Settings and Celery
app (`worker.app`). Names are the contract with the API (`core.celery_config`); the API never
imports this module."""

from __future__ import annotations

from celery.exceptions import Ignore

from core.celery_config import FINALIZE_JOB, JOB_ENDED, PREPARE_JOB, REAP, RUN_STEP
from worker import flows
from worker.app import app, settings
from worker.webhooks import deliver_webhooks  # noqa: F401  (registers sdpo.deliver_webhooks; JSON logs)


def _chain_on(outcome: flows.Outcome) -> None:
    # Ignore ends the chain here: the next step must not start when this one did not succeed
    # (failed, cancelled, paused, or a duplicate delivery of a step that runs elsewhere).
    if outcome is flows.Outcome.STOP:
        raise Ignore()


@app.task(name=PREPARE_JOB, ignore_result=True)
def prepare_job(job_id: str) -> None:
    _chain_on(flows.prepare_job(job_id, settings=settings))


@app.task(name=RUN_STEP, ignore_result=True)
def run_step(job_id: str, index: int) -> None:
    _chain_on(flows.run_step(job_id, index, settings=settings, app=app))


@app.task(name=FINALIZE_JOB, ignore_result=True)
def finalize_job(job_id: str) -> None:
    _chain_on(flows.finalize_job(job_id, settings=settings))


@app.task(name=JOB_ENDED, ignore_result=True)
def job_ended(job_id: str) -> None:
    flows.end_job(job_id, settings=settings)


@app.task(name=REAP, ignore_result=True)
def reap(startup: bool = False) -> int:
    return flows.reap(settings=settings, app=app, startup=startup)
