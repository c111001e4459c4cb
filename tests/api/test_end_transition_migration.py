"""The migration a9d3f6b2e871 (jobs.end_transition_at), on Postgres and on SQLite: jobs that ended
before it count as having had their end transition at their end (the reaper does not replay history);
jobs still running, queued or paused stay due for theirs."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from core.db import make_engine
from core.migrate import alembic_config, upgrade_head

BEFORE = "e4a7b2c9d031"
T0 = datetime(2026, 11, 30, 8, tzinfo=UTC)
ENDED = datetime(2026, 11, 30, 9, tzinfo=UTC)
UPDATED = datetime(2026, 11, 30, 10, tzinfo=UTC)


def test_upgrade_marks_the_jobs_that_ended_before_it_and_only_those(old_database):
    command.upgrade(alembic_config(old_database), BEFORE)
    meta = sa.MetaData()
    engine = make_engine(old_database)
    try:
        meta.reflect(engine, only=["models", "files", "jobs"])
        models, files, jobs = (meta.tables[n] for n in ("models", "files", "jobs"))
        statuses = {"j-succeeded": ("succeeded", ENDED), "j-failed": ("failed", ENDED),
                    "j-cancelled": ("cancelled", None),  # ended without finished_at: its last update counts
                    "j-running": ("running", None), "j-queued": ("queued", None), "j-paused": ("paused", None)}
        with engine.begin() as conn:
            conn.execute(models.insert(), {"id": "m-1", "source": "local", "uri": "file:///m",
                                           "default_hyperparameters": {}, "created_at": T0})
            conn.execute(files.insert(), {"id": "file-1", "owner": "alice", "filename": "a.jsonl", "bytes": 1,
                                          "sha256": "0" * 64, "purpose": "fine-tune", "rows": 1, "status": "processed",
                                          "report": {}, "storage_uri": "local://files/file-1", "created_at": T0})
            conn.execute(jobs.insert(), [
                {"id": job_id, "owner": "alice", "model": "m-1", "model_id": "m-1", "training_file_id": "file-1",
                 "method": {"type": "dpo"}, "hyperparameters": {}, "n_steps": 1, "current_step": 1,
                 "status": status, "seed": 0, "created_at": T0, "updated_at": UPDATED, "finished_at": finished}
                for job_id, (status, finished) in statuses.items()])

        upgrade_head(old_database)

        meta = sa.MetaData()
        meta.reflect(engine, only=["jobs"])
        jobs = meta.tables["jobs"]
        with engine.connect() as conn:
            marked = dict(conn.execute(sa.select(jobs.c.id, jobs.c.end_transition_at)).all())
        as_utc = {k: v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v for k, v in marked.items()}
        assert as_utc == {"j-succeeded": ENDED, "j-failed": ENDED, "j-cancelled": UPDATED,
                          "j-running": None, "j-queued": None, "j-paused": None}
    finally:
        engine.dispose()
