"""The training process's events into the job's log (their wording: core/jobs/events.py), written
once even when the database makes the supervisor send them again; and the metrics a trainer
checkpoint holds that a dead worker never wrote (backfilled when the next attempt resumes from it)."""

from __future__ import annotations

import json
from pathlib import Path

from core import ids
from core.jobs.events import record_backfilled_metrics, record_engine_event
from core.jobs.repository import existing_event_ids
from worker import db
from worker.workdir import TRAINER_STATE

EVENT_ID_KEY = "_event_id"  # set by the relay on each engine event: its id in the events table


def backfill_metrics(job_id: str, index: int, checkpoint: Path, recorded: int) -> int:
    """Write the metrics of optimizer steps that a trainer checkpoint holds but the events lack.

    A worker that dies takes the events it had not yet written with it (at most half a second's),
    and the training child it leaves keeps training until it has saved (SIGTERM). The checkpoint's
    `trainer_state.json` logs every optimizer step up to it, so those steps are written from there
    (marked `backfilled`). Returns the global step the events now reach.
    """
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return recorded
    missing = [h for h in state.get("log_history", [])
               if isinstance(h.get("step"), int) and h["step"] > recorded and "loss" in h and "train_runtime" not in h]
    if not missing:
        return recorded
    with db.session() as s:
        record_backfilled_metrics(s, job_id, index, missing, state.get("max_steps"))
    return max(recorded, max(h["step"] for h in missing))


class Relay:
    """Writes the child's JSON lines into the job's events, safe to call again with the same events.

    The supervisor calls it again with the same (and newer) events when the database did not
    answer; each event gets its id the first time it is seen, and ids already committed (a COMMIT
    whose answer was lost) are skipped. Metrics of optimizer steps that an earlier attempt already
    recorded are not written again: a resumed attempt redoes the steps since its trainer
    checkpoint, and the log keeps one metrics event per optimizer step.
    """

    def __init__(self, job_id: str, index: int, attempt: int, recorded_global_step: int):
        self.job_id, self.index, self.attempt = job_id, index, attempt
        self.recorded = recorded_global_step

    def __call__(self, events: list[dict]) -> None:
        for e in events:
            e.setdefault(EVENT_ID_KEY, ids.new_id(ids.EVENT))
        with db.session() as s:
            done = existing_event_ids(s, [e[EVENT_ID_KEY] for e in events])
            for e in events:
                if e[EVENT_ID_KEY] not in done:
                    line = {k: v for k, v in e.items() if k != EVENT_ID_KEY}
                    record_engine_event(s, self.job_id, self.index, self.attempt, self.recorded, line,
                                        event_id=e[EVENT_ID_KEY])
