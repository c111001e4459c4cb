"""The training process's events into the job's log: each JSON line the engine prints (metrics,
phases, warnings, errors) becomes one event with a readable message, written once even when the
database makes the supervisor send it again; and the metrics a trainer checkpoint holds that a dead
worker never wrote (backfilled when the next attempt resumes from it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from core import ids
from core.jobs import add_event
from core.jobs.lifecycle import format_metric as _f
from core.jobs.repository import existing_event_ids, metrics_global_steps
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
        done = metrics_global_steps(s, job_id, index)
        for h in missing:
            if h["step"] in done:
                continue
            data = {"step": index, "global_step": h["step"], "max_steps": state.get("max_steps"),
                    **{k: _finite(v) for k, v in h.items() if k != "step"}, "tokens_per_second": None,
                    "backfilled": True}
            add_event(s, job_id, f"Step {index}: global step {h['step']}/{state.get('max_steps')}, loss "
                      f"{_f(h.get('loss'))}", type="metrics", step_index=index, data=data)
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
                    self._record(s, e)

    def _record(self, s, e: dict) -> None:
        index, job_id, event_id = self.index, self.job_id, e[EVENT_ID_KEY]
        fields = {k: v for k, v in e.items() if k not in ("event", EVENT_ID_KEY)}
        kind = e.get("event")
        if kind == "metrics":
            global_step = e.get("global_step")
            if isinstance(global_step, int) and global_step <= self.recorded:
                return
            loss = e.get("loss")
            msg = f"Step {index}: global step {global_step}/{e.get('max_steps')}"
            if isinstance(loss, (int, float)):
                msg += f", loss {loss:.4f}"
            add_event(s, job_id, msg, type="metrics", step_index=index, data=fields, event_id=event_id)
        elif kind == "info" and e.get("phase") == "resume":
            at = _checkpoint_step(e.get("checkpoint"))
            text = f"Step {index}: attempt {self.attempt} resumes from its trainer checkpoint at global step {at}"
            if at is not None and self.recorded > at:
                text += (f"; global steps {at + 1}-{self.recorded} are trained again (their metrics, recorded by "
                         "the earlier attempt, are not repeated)")
            add_event(s, job_id, text + ".", step_index=index, event_id=event_id,
                      data={**fields, "checkpoint": Path(str(e.get("checkpoint"))).name, "global_step": at,
                            "redo_until": max(self.recorded, at or 0), "attempt": self.attempt})
        elif kind == "info" and e.get("phase") in ("start", "reference_logps", "eval", "train_end"):
            text = {"start": f"Step {index}: {e.get('pairs')} pairs on {e.get('device')}",
                    "reference_logps": f"Step {index}: reference log-probs precomputed, mean gamma_ref "
                                       f"{_f(e.get('mean_gamma_ref'))}",
                    "eval": f"Step {index}: held-out reward accuracy {_f(e.get('reward_accuracy'))}",
                    "train_end": f"Step {index}: training finished"}[e["phase"]]
            add_event(s, job_id, text, step_index=index, data=fields, event_id=event_id)
        elif kind == "info" and e.get("phase") == "pairs_dropped":
            dropped = e.get("pairs_dropped") or {}
            parts = [f"{v.get('count')} {reason.replace('_', ' ')} (lines {', '.join(map(str, v.get('lines') or []))})"
                     for reason, v in dropped.items()]
            add_event(s, job_id, f"Step {index}: {sum(v.get('count', 0) for v in dropped.values())} of {e.get('pairs')} "
                      f"pair(s) dropped, no training signal at max_length={e.get('max_length')}: {'; '.join(parts)}.",
                      level="warn", step_index=index, data=fields, event_id=event_id)
        elif kind == "error":
            add_event(s, job_id, f"Step {index}: {e.get('message')}", level="error", step_index=index,
                      data=fields, event_id=event_id)
        elif kind == "warning":  # e.g. first_loss_not_ln2: the step goes on, the user is told
            add_event(s, job_id, f"Step {index}: warning: {e.get('message')}", level="warn", step_index=index,
                      data=fields, event_id=event_id)


def _finite(value):
    """JSON columns refuse NaN and infinities (transformers may log them): None instead."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _checkpoint_step(path) -> int | None:
    number = Path(str(path or "")).name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None
