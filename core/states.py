"""The job and step state machines: the one place that says which status changes are allowed.

Every status change goes through `transition()`, which refuses a forbidden edge with
`InvalidTransition` instead of silently overwriting (a forbidden edge means a bug or a lost race,
and both must be loud). Code that changes status with a conditional UPDATE (the worker's claim
of a step) uses `sources()` to build its WHERE clause from the same table.

Job
    validating_files -> queued | failed | cancelled
    queued           -> running | paused | failed | cancelled
    running          -> succeeded | failed | cancelled | pausing
    pausing          -> paused | succeeded | failed | cancelled
    paused           -> queued | running | cancelled
    succeeded, failed, cancelled: terminal

    The API creates jobs through validating_files -> queued in one transaction (files are
    validated at upload time). `pausing` means "pause requested, the worker is saving the trainer
    state"; it may still end in succeeded if the last step finished first. Resume moves
    paused -> queued and enqueues the remaining steps.

Step
    pending -> queued | cancelled
    queued  -> running | pending | cancelled
    running -> succeeded | failed | cancelled | queued
    succeeded, failed, cancelled: terminal

    queued -> pending undoes a queueing when the job pauses before the step started;
    running -> queued requeues a step whose worker died or that was paused (its trainer
    checkpoint lets the next attempt resume).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Protocol

from core.clock import utcnow
from core.errors import InvalidTransition


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


J, S = JobStatus, StepStatus

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.VALIDATING_FILES: frozenset({J.QUEUED, J.FAILED, J.CANCELLED}),
    J.QUEUED: frozenset({J.RUNNING, J.PAUSED, J.FAILED, J.CANCELLED}),
    J.RUNNING: frozenset({J.SUCCEEDED, J.FAILED, J.CANCELLED, J.PAUSING}),
    J.PAUSING: frozenset({J.PAUSED, J.SUCCEEDED, J.FAILED, J.CANCELLED}),
    J.PAUSED: frozenset({J.QUEUED, J.RUNNING, J.CANCELLED}),
    J.SUCCEEDED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
}

STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    S.PENDING: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.PENDING, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

JOB_TERMINAL = frozenset(s for s, targets in JOB_TRANSITIONS.items() if not targets)
STEP_TERMINAL = frozenset(s for s, targets in STEP_TRANSITIONS.items() if not targets)
# Jobs that still hold on to their files (a file they use cannot be deleted).
JOB_ACTIVE = frozenset(JobStatus) - JOB_TERMINAL


class _HasStatus(Protocol):
    status: str


def _table(new_status: JobStatus | StepStatus) -> dict:
    # The enum type of the target says which machine applies: "queued" exists in both.
    if isinstance(new_status, JobStatus):
        return JOB_TRANSITIONS
    if isinstance(new_status, StepStatus):
        return STEP_TRANSITIONS
    raise TypeError(f"transition() needs a JobStatus or StepStatus, got {new_status!r}")


def can_transition(old_status: str, new_status: JobStatus | StepStatus) -> bool:
    table = _table(new_status)
    old = type(new_status)(old_status)
    return new_status in table[old]


def sources(new_status: JobStatus | StepStatus) -> frozenset:
    """Every status from which `new_status` may be reached (for conditional UPDATEs)."""
    table = _table(new_status)
    return frozenset(old for old, targets in table.items() if new_status in targets)


def transition(obj: _HasStatus, new_status: JobStatus | StepStatus, *, now: datetime | None = None) -> None:
    """Move a Job or JobStep to `new_status`, or raise `InvalidTransition`.

    Also keeps the timestamps that follow from status: `started_at` on the first `running`,
    `finished_at` on a terminal status, `updated_at` always (where the object has them).
    """
    if not can_transition(obj.status, new_status):
        kind = "job" if isinstance(new_status, JobStatus) else "step"
        raise InvalidTransition(f"a {kind} cannot go from {obj.status} to {new_status.value}",
                                code="invalid_transition")
    now = now or utcnow()
    obj.status = new_status.value
    terminal = JOB_TERMINAL if isinstance(new_status, JobStatus) else STEP_TERMINAL
    if new_status.value == "running" and getattr(obj, "started_at", None) is None and hasattr(obj, "started_at"):
        obj.started_at = now
    if new_status in terminal and hasattr(obj, "finished_at"):
        obj.finished_at = now
    if hasattr(obj, "updated_at"):
        obj.updated_at = now
