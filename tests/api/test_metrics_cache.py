"""/metrics' checkpoint-cache counter, read from the structured field of the worker's step events
(`data.checkpoint_cache`) on real Postgres, through the partial index kept for it."""

from __future__ import annotations

from sqlalchemy import text

from core.jobs import add_event
from core.jobs import repository as jobs_repository
from tests.api.factories import file_row, job_row
from tests.api.test_metrics import parse


def _cache_event(db, job_id: str, step: int, word: str) -> None:
    # What worker/flows.py `_record_cache` writes.
    add_event(db, job_id, f"Checkpoint cache {word}: step {step} starts from ft:x.", step_index=step,
              data={"checkpoint_cache": word, "checkpoint": "ft:x", "bytes": 10})


def test_cache_hits_and_misses_are_counted_from_the_event_field(client, db, base_model):
    files = file_row(db, "bob", rows=3)
    one = job_row(db, "alice", files.id, status="running", n_steps=3)
    two = job_row(db, "bob", files.id, status="running", n_steps=2)
    _cache_event(db, one.id, 1, "miss")
    _cache_event(db, one.id, 2, "hit")
    _cache_event(db, one.id, 3, "hit")
    _cache_event(db, two.id, 1, "miss")
    _cache_event(db, two.id, 2, "hit")
    # Not counted: the same words in a message without the field (a user-visible text is not a
    # counter), a job-level event, and other structured events.
    add_event(db, two.id, "Checkpoint cache hit: step 2 starts from ft:x.", step_index=2)
    add_event(db, two.id, "job-level", data={"checkpoint_cache": "hit"})
    add_event(db, two.id, "m", type="metrics", step_index=2, data={"step": 2, "loss": 0.5})
    db.commit()

    assert jobs_repository.count_checkpoint_cache_events(db) == {"hit": 3, "miss": 2}
    m = parse(client.get("/metrics").text)
    assert m['sdpo_checkpoint_cache_total{result="hit"}'] == 3
    assert m['sdpo_checkpoint_cache_total{result="miss"}'] == 2


def test_no_cache_events_count_zero(client, db):
    m = parse(client.get("/metrics").text)
    assert m['sdpo_checkpoint_cache_total{result="hit"}'] == 0
    assert m['sdpo_checkpoint_cache_total{result="miss"}'] == 0


def test_the_count_can_use_the_partial_index(db):
    """The query's expression and predicate match ix_events_checkpoint_cache, so Postgres can read
    the cache events alone (with sequential scans off it must pick the index, or the query and the
    index have drifted apart)."""
    db.execute(text("SET LOCAL enable_seqscan = off"))
    query = text("EXPLAIN SELECT (data ->> 'checkpoint_cache'), count(*) FROM events "
                 "WHERE (data ->> 'checkpoint_cache') IN ('hit', 'miss') AND step_index IS NOT NULL "
                 "GROUP BY (data ->> 'checkpoint_cache')")
    plan = "\n".join(row[0] for row in db.execute(query))
    assert "ix_events_checkpoint_cache" in plan, plan
