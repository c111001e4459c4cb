"""The webhook outbox is installed on the session factories that change jobs, explicitly, by
core.db.make_session_factory, not as a side effect of importing the models: the API's factory and
the worker's both write a delivery with a committed status change; a session made some other way
writes none."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from core import ids
from core.db import session_scope
from core.models import Job, JobStep, Webhook, WebhookDelivery
from core.states import JobStatus, StepStatus, transition
from core.webhooks import EVENT_TYPES, install_outbox
from tests.api.factories import file_row

OWNER = "outbox-owner"


@pytest.fixture
def file_id(clean_state, db, base_model) -> str:
    """A training file for the jobs (and the base model "tiny-base" they name)."""
    return file_row(db, OWNER).id


def _running_job_with_a_webhook(factory, file_id: str) -> str:
    with session_scope(factory) as s:
        s.add(Webhook(id=ids.new_id("wh"), owner=OWNER, url="https://example.test/hook", secret="whsec_AAAA",
                      events=list(EVENT_TYPES)))
        job = Job(id=ids.new_id(ids.JOB), owner=OWNER, model="tiny-base", model_id="tiny-base",
                  training_file_id=file_id,
                  method={"type": "sdpo"}, hyperparameters={}, n_steps=1, status="running", seed=0, current_step=1)
        s.add(job)
        s.add(JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=1, status="running", hyperparameters={}))
    return job.id


def _finish(factory, job_id: str) -> None:
    with session_scope(factory) as s:
        transition(s.scalars(select(JobStep).where(JobStep.job_id == job_id)).one(), StepStatus.SUCCEEDED)
        transition(s.get(Job, job_id), JobStatus.SUCCEEDED)


def _deliveries(factory, job_id: str) -> list[str]:
    with session_scope(factory) as s:
        return list(s.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.job_id == job_id)
                              .order_by(WebhookDelivery.created_at)))


def test_importing_the_models_installs_no_listener():
    code = ("import sys\nfrom sqlalchemy import event\nfrom sqlalchemy.orm import Session\nimport core.models\n"
            "assert 'core.webhooks' not in sys.modules, 'core.models imported core.webhooks'\n"
            "import core.webhooks\n"
            "assert not event.contains(Session, 'before_flush', core.webhooks._record_status_changes)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_api_factory_writes_the_outbox(file_id, settings):
    from api.main import create_app

    factory = create_app(settings).state.services.session_factory
    try:
        job_id = _running_job_with_a_webhook(factory, file_id)
        _finish(factory, job_id)
        assert _deliveries(factory, job_id) == ["step.succeeded", "job.succeeded"]
    finally:
        factory.kw["bind"].dispose()


def test_the_worker_factory_writes_the_outbox(file_id, settings, monkeypatch):
    import worker.db

    monkeypatch.setattr(worker.db, "get_settings", lambda: settings)
    worker.db.reset()
    try:
        factory = worker.db._factory()
        job_id = _running_job_with_a_webhook(factory, file_id)
        with worker.db.session() as s:  # the worker's own unit of work
            step = s.scalars(select(JobStep).where(JobStep.job_id == job_id)).one()
            step.error = {"code": "step_failed", "message": "boom"}
            transition(step, StepStatus.FAILED)
            transition(s.get(Job, job_id), JobStatus.FAILED)
        assert _deliveries(factory, job_id) == ["step.failed", "job.failed"]
    finally:
        worker.db.reset()


def test_a_session_not_made_by_make_session_factory_writes_no_delivery(file_id, db_engine, session_factory):
    job_id = _running_job_with_a_webhook(session_factory, file_id)
    _finish(sessionmaker(bind=db_engine, expire_on_commit=False), job_id)
    assert _deliveries(session_factory, job_id) == []


def test_install_outbox_is_idempotent(file_id, session_factory):
    assert install_outbox(install_outbox(session_factory)) is session_factory
    job_id = _running_job_with_a_webhook(session_factory, file_id)
    _finish(session_factory, job_id)
    with session_scope(session_factory) as s:
        count = s.scalar(select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
    assert count == 2  # one per change, not one per install


def test_a_cancel_through_the_factory_is_one_delivery(file_id, session_factory):
    job_id = _running_job_with_a_webhook(session_factory, file_id)
    with session_scope(session_factory) as s:
        transition(s.get(Job, job_id), JobStatus.CANCELLED)
    assert _deliveries(session_factory, job_id) == ["job.cancelled"]
