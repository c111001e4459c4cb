"""The retry budget of a step is a column (JobStep.failed_attempts, #14), not a count of warn events:
`lifecycle.requeue_or_fail_step` on real Postgres, and the migration that backfills it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from core.db import make_engine
from core.jobs import add_event, get_steps, lifecycle
from core.migrate import alembic_config, upgrade_head
from core.models import Job
from core.queue import make_celery
from tests.api.factories import file_row, job_row


@pytest.fixture
def running_job(db, clean_state, base_model):
    job = job_row(db, "alice", file_row(db, "alice").id, status="running", n_steps=2)
    return db.get(Job, job.id)


def test_failed_attempts_are_counted_on_the_step_until_the_budget_is_spent(db, settings, running_job):
    app = make_celery(settings)
    outcomes = []
    for attempt in (1, 2, 3):  # max_step_attempts defaults to 3
        steps = get_steps(db, running_job.id)
        step = steps[0]
        step.status, step.attempt = "running", attempt
        if attempt == 2:  # a pause's warn event is no failed attempt, and neither is any other event
            add_event(db, running_job.id, "paused", level="warn", step_index=1, data={"paused": True})
        outcomes.append(lifecycle.requeue_or_fail_step(db, app, running_job, steps, step, "the worker was lost",
                                                       max_attempts=settings.max_step_attempts))
        db.commit()
        assert step.failed_attempts == attempt
    assert outcomes == [True, True, False]
    db.refresh(running_job)
    step1, step2 = get_steps(db, running_job.id)
    assert (running_job.status, running_job.error["code"]) == ("failed", "retries_exhausted")
    assert (step1.status, step2.status) == ("failed", "cancelled")
    assert "after 3 attempts" in step1.error["message"]


def test_the_migration_backfills_failed_attempts_from_the_warn_events(old_database):
    command.upgrade(alembic_config(old_database), "5c1d0e7a9b42")
    now = datetime(2026, 11, 30, tzinfo=UTC)
    meta = sa.MetaData()
    engine = make_engine(old_database)
    try:
        meta.reflect(engine, only=["files", "models", "jobs", "job_steps", "events"])
        files, models, jobs, steps, events = (meta.tables[n] for n in ("files", "models", "jobs", "job_steps", "events"))
        with engine.begin() as conn:
            conn.execute(files.insert(), {"id": "file-1", "owner": "alice", "filename": "x.jsonl", "bytes": 1,
                                          "sha256": "0" * 64, "purpose": "fine-tune", "status": "processed", "rows": 1,
                                          "report": {}, "storage_uri": "local://files/file-1", "created_at": now})
            conn.execute(models.insert(), {"id": "m", "source": "local", "uri": "file:///m",
                                           "default_hyperparameters": {}, "created_at": now})
            conn.execute(jobs.insert(), {"id": "ftjob-1", "owner": "alice", "model": "m", "model_id": "m",
                                         "training_file_id": "file-1", "method": {}, "hyperparameters": {},
                                         "n_steps": 2, "current_step": 1, "status": "running", "seed": 0,
                                         "created_at": now, "updated_at": now})
            conn.execute(steps.insert(), [
                {"id": f"step-{k}", "job_id": "ftjob-1", "index": k, "status": "queued", "hyperparameters": {},
                 "attempt": 2, "created_at": now, "updated_at": now} for k in (1, 2)])
            conn.execute(events.insert(), [
                {"id": f"ev-{i}", "job_id": "ftjob-1", "step_index": k, "level": level, "type": "message",
                 "message": "x", "data": data, "created_at": now}
                for i, (k, level, data) in enumerate([
                    (1, "warn", {"failed_attempt": 1, "reason": "lost"}),
                    (1, "warn", {"failed_attempt": 2, "reason": "crashed"}),
                    (1, "warn", {"paused": True}),
                    (1, "info", {"failed_attempt": 9}),
                    (2, "warn", {"failed_attempt": 1, "reason": "lost"})], start=1)])
        upgrade_head(old_database)
        with engine.connect() as conn:
            got = dict(conn.execute(sa.text("SELECT id, failed_attempts FROM job_steps")).all())
        assert got == {"step-1": 2, "step-2": 1}
    finally:
        engine.dispose()
