"""Where a job is: the `progress` field of the job object, computed from its steps and metrics events.

    {"step": 2, "n_steps": 3, "step_status": "running", "global_step": 12, "max_steps": 20,
     "percent": 53.3, "tokens_per_second": 812.5, "eta_seconds": 41, "queue_position": null}

- `step` is k of `n_steps` (0 before step 1 starts); `global_step`/`max_steps` are the optimizer steps
  of step k, from its latest metrics event.
- `percent` counts finished steps whole and the running one by its optimizer steps.
- `eta_seconds` (running jobs): the running step's remaining optimizer steps at its measured rate,
  plus each later step at the mean duration of the finished ones (or of this one, projected).
  The job object's OpenAI field `estimated_finish` is now + eta.
- `queue_position` (1 = next) while the job waits for a worker: among queued jobs by creation
  time, or, for a running job whose next step waits, among the queued steps by the time they were
  queued. Other owners' work is counted, never shown.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.clock import utcnow
from core.jobs import repository
from core.models import Job, JobStep
from core.states import JobStatus, StepStatus


def _queue_position(db: Session, job: Job, steps: list[JobStep]) -> int | None:
    if job.status == JobStatus.QUEUED:
        return repository.queued_jobs_before(db, job) + 1
    if job.status == JobStatus.RUNNING and not any(s.status == StepStatus.RUNNING for s in steps):
        waiting = next((s for s in steps if s.status == StepStatus.QUEUED), None)
        if waiting is None:
            return None
        return repository.waiting_steps_before(db, waiting) + 1
    return None


def _seconds(later, earlier) -> float:
    return max((later - earlier).total_seconds(), 0.0)


def job_progress(db: Session, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """`progress` for each job, by job id (a few queries for the whole page)."""
    if not jobs:
        return {}
    ids = [j.id for j in jobs]
    steps_of = repository.steps_of_jobs(db, ids)
    latest = repository.latest_metrics_events(db, ids)
    now = utcnow()
    out = {}
    for job in jobs:
        steps = steps_of[job.id]
        k = job.current_step
        current = steps[k - 1] if 1 <= k <= len(steps) else None
        event = latest.get(job.id)
        data = (event.data or {}) if event is not None else {}
        running = current is not None and current.status == StepStatus.RUNNING
        ours = event is not None and data.get("step") == k and current is not None
        global_step = data.get("global_step") if ours else (0 if k else None)
        max_steps = data.get("max_steps") if ours else None
        done = sum(1 for s in steps if s.status == StepStatus.SUCCEEDED)
        fraction = 0.0
        if running and ours and max_steps:
            fraction = min(max(global_step / max_steps, 0.0), 1.0)
        if job.status == JobStatus.SUCCEEDED:
            percent = 100.0
        else:
            percent = round(100.0 * min((done + fraction) / max(job.n_steps, 1), 1.0), 1)

        eta = None
        if job.status in (JobStatus.RUNNING, JobStatus.PAUSING) and running and current.started_at:
            finished = [_seconds(s.finished_at, s.started_at) for s in steps
                        if s.status == StepStatus.SUCCEEDED and s.started_at and s.finished_at]
            remaining_current = None
            if ours and max_steps and global_step:
                first = repository.first_metrics_event(db, job.id, k)
                gs0 = (first.data or {}).get("global_step", 0) if first is not None else 0
                if first is not None and global_step > gs0 and event.created_at > first.created_at:
                    per_step = _seconds(event.created_at, first.created_at) / (global_step - gs0)
                else:  # one log so far: the step's whole time so far (loading included) per optimizer step
                    per_step = _seconds(now, current.started_at) / global_step
                remaining_current = per_step * max(max_steps - global_step, 0)
            if remaining_current is not None:
                projected = _seconds(now, current.started_at) + remaining_current
                later = job.n_steps - k
                per_later = sum(finished) / len(finished) if finished else projected
                eta = int(round(remaining_current + later * per_later))
        out[job.id] = {
            "step": k,
            "n_steps": job.n_steps,
            "step_status": current.status if current is not None else None,
            "global_step": global_step,
            "max_steps": max_steps,
            "percent": percent,
            "tokens_per_second": data.get("tokens_per_second") if (ours and running) else None,
            "eta_seconds": eta,
            "queue_position": _queue_position(db, job, steps),
        }
    return out
