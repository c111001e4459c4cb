"""core/jobs/events.py against real Postgres: the engine's lines as the job log words them, the
metrics a resumed attempt trains again written once, backfilled metrics only where none exist."""

from __future__ import annotations

from sqlalchemy import select

from core import ids
from core.jobs.events import record_backfilled_metrics, record_engine_event
from core.models import Event
from tests.api.factories import file_row, job_row


def _log(db, job_id: str) -> list[tuple[str, str, str]]:
    db.expire_all()
    return [(e.level, e.type, e.message) for e in db.scalars(select(Event).where(Event.job_id == job_id)
                                                             .order_by(Event.seq))]


def test_engine_lines_become_worded_events_and_metrics_an_earlier_attempt_recorded_are_skipped(
        db, clean_state, base_model):
    job = job_row(db, "alice", file_row(db, "alice").id, status="running")
    lines = [
        {"event": "info", "phase": "resume", "checkpoint": "/w/attempt-1/trainer/checkpoint-2"},
        {"event": "metrics", "global_step": 3, "max_steps": 6, "loss": 0.6931},  # recorded by attempt 1
        {"event": "metrics", "global_step": 5, "max_steps": 6, "loss": 0.5},
        {"event": "info", "phase": "reference_logps", "mean_gamma_ref": -0.25},
        {"event": "info", "phase": "memory", "bytes": 1},  # not shown in the log
        {"event": "info", "phase": "pairs_dropped", "pairs": 10, "max_length": 64,
         "pairs_dropped": {"prompt_too_long": {"count": 2, "lines": [3, 7]}}},
        {"event": "warning", "message": "first loss 0.7 is not ln 2"},
        {"event": "error", "message": "the loss is NaN"},
    ]
    for line in lines:
        record_engine_event(db, job.id, 1, 2, 4, line, event_id=ids.new_id(ids.EVENT))
    db.commit()
    assert _log(db, job.id) == [
        ("info", "message", "Step 1: attempt 2 resumes from its trainer checkpoint at global step 2; global steps "
                            "3-4 are trained again (their metrics, recorded by the earlier attempt, are not repeated)."),
        ("info", "metrics", "Step 1: global step 5/6, loss 0.5000"),
        ("info", "message", "Step 1: reference log-probs precomputed, mean gamma_ref -0.2500"),
        ("warn", "message", "Step 1: 2 of 10 pair(s) dropped, no training signal at max_length=64: 2 prompt too "
                            "long (lines 3, 7)."),
        ("warn", "message", "Step 1: warning: first loss 0.7 is not ln 2"),
        ("error", "message", "Step 1: the loss is NaN"),
    ]
    resume = db.scalars(select(Event).where(Event.job_id == job.id).order_by(Event.seq)).first()
    assert (resume.data["checkpoint"], resume.data["global_step"], resume.data["redo_until"]) == ("checkpoint-2", 2, 4)


def test_backfilled_metrics_fill_only_the_missing_optimizer_steps(db, clean_state, base_model):
    job = job_row(db, "alice", file_row(db, "alice").id, status="running")
    record_engine_event(db, job.id, 1, 1, 0, {"event": "metrics", "global_step": 1, "max_steps": 4, "loss": 0.69},
                        event_id=ids.new_id(ids.EVENT))
    db.commit()
    history = [{"step": 1, "loss": 0.69}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.4}]
    record_backfilled_metrics(db, job.id, 1, history, 4)
    db.commit()
    events = list(db.scalars(select(Event).where(Event.job_id == job.id).order_by(Event.seq)))
    assert [(e.data["global_step"], e.data.get("backfilled", False)) for e in events] == [
        (1, False), (2, True), (3, True)]
    assert events[1].data["loss"] is None  # NaN does not fit a JSON column
    assert events[2].message == "Step 1: global step 3/4, loss 0.4000"
