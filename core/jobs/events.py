"""The job log's wording for what a training step reports: each JSON line the engine prints
(`sdpo_engine.protocol.EventKind`: metrics, info phases, warnings, errors) becomes one event with a
readable message, and metrics read back from a trainer checkpoint are written as `backfilled`.
Functions add to the caller's session; worker/relay.py decides which lines are new."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

from sqlalchemy.orm import Session

from core.jobs.lifecycle import format_metric
from core.jobs.repository import add_event, metrics_global_steps
from sdpo_engine.protocol import EventKind, InfoPhase

_PHASE_TEXT = (InfoPhase.START, InfoPhase.REFERENCE_LOGPS, InfoPhase.EVAL, InfoPhase.TRAIN_END)


def record_engine_event(session: Session, job_id: str, index: int, attempt: int, recorded_global_step: int,
                        line: dict[str, Any], *, event_id: str) -> None:
    """One engine line of step `index`'s attempt `attempt` as an event with id `event_id` (its other
    fields become the event's `data`). Metrics at or below `recorded_global_step` (recorded by an
    earlier attempt, trained again after a resume) and kinds the log does not show are skipped."""
    fields = {k: v for k, v in line.items() if k != "event"}
    kind, phase = line.get("event"), line.get("phase")
    if kind == EventKind.METRICS:
        global_step = line.get("global_step")
        if isinstance(global_step, int) and global_step <= recorded_global_step:
            return
        loss = line.get("loss")
        msg = f"Step {index}: global step {global_step}/{line.get('max_steps')}"
        if isinstance(loss, (int, float)):
            msg += f", loss {loss:.4f}"
        add_event(session, job_id, msg, type="metrics", step_index=index, data=fields, event_id=event_id)
    elif kind == EventKind.INFO and phase == InfoPhase.RESUME:
        at = _checkpoint_step(line.get("checkpoint"))
        text = f"Step {index}: attempt {attempt} resumes from its trainer checkpoint at global step {at}"
        if at is not None and recorded_global_step > at:
            text += (f"; global steps {at + 1}-{recorded_global_step} are trained again (their metrics, recorded "
                     "by the earlier attempt, are not repeated)")
        add_event(session, job_id, text + ".", step_index=index, event_id=event_id,
                  data={**fields, "checkpoint": PurePath(str(line.get("checkpoint"))).name, "global_step": at,
                        "redo_until": max(recorded_global_step, at or 0), "attempt": attempt})
    elif kind == EventKind.INFO and phase in _PHASE_TEXT:
        text = {InfoPhase.START: f"Step {index}: {line.get('pairs')} pairs on {line.get('device')}",
                InfoPhase.REFERENCE_LOGPS: f"Step {index}: reference log-probs precomputed, mean gamma_ref "
                                           f"{format_metric(line.get('mean_gamma_ref'))}",
                InfoPhase.EVAL: f"Step {index}: held-out reward accuracy {format_metric(line.get('reward_accuracy'))}",
                InfoPhase.TRAIN_END: f"Step {index}: training finished"}[InfoPhase(phase)]
        add_event(session, job_id, text, step_index=index, data=fields, event_id=event_id)
    elif kind == EventKind.INFO and phase == InfoPhase.PAIRS_DROPPED:
        dropped = line.get("pairs_dropped") or {}
        parts = [f"{v.get('count')} {reason.replace('_', ' ')} (lines {', '.join(map(str, v.get('lines') or []))})"
                 for reason, v in dropped.items()]
        add_event(session, job_id, f"Step {index}: {sum(v.get('count', 0) for v in dropped.values())} of "
                  f"{line.get('pairs')} pair(s) dropped, no training signal at max_length={line.get('max_length')}: "
                  f"{'; '.join(parts)}.", level="warn", step_index=index, data=fields, event_id=event_id)
    elif kind == EventKind.ERROR:
        add_event(session, job_id, f"Step {index}: {line.get('message')}", level="error", step_index=index,
                  data=fields, event_id=event_id)
    elif kind == EventKind.WARNING:  # e.g. first_loss_not_ln2: the step goes on, the user is told
        add_event(session, job_id, f"Step {index}: warning: {line.get('message')}", level="warn", step_index=index,
                  data=fields, event_id=event_id)


def record_backfilled_metrics(session: Session, job_id: str, index: int, log_history: list[dict[str, Any]],
                              max_steps: int | None) -> None:
    """A metrics event (marked `backfilled`) for each optimizer step of `log_history` (entries of a
    trainer checkpoint's `trainer_state.json`: {"step", "loss", …}) that step `index` has none for."""
    done = metrics_global_steps(session, job_id, index)
    for h in log_history:
        if h["step"] in done:
            continue
        data = {"step": index, "global_step": h["step"], "max_steps": max_steps,
                **{k: _finite(v) for k, v in h.items() if k != "step"}, "tokens_per_second": None,
                "backfilled": True}
        add_event(session, job_id, f"Step {index}: global step {h['step']}/{max_steps}, loss "
                  f"{format_metric(h.get('loss'))}", type="metrics", step_index=index, data=data)


def _finite(value: Any) -> Any:
    """JSON columns refuse NaN and infinities (transformers may log them): None instead."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _checkpoint_step(path: Any) -> int | None:
    number = PurePath(str(path or "")).name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None
