"""The job lifecycle's one home: `repository` holds every query on jobs, steps, checkpoints and
events; `lifecycle` every state change (API and worker alike); `events` the wording of what a
training step reports. The names callers use are re-exported here."""

from core.jobs.lifecycle import (
    cancel_job,
    fine_tuned_model_name,
    pause_job,
    remaining_step_indexes,
    resume_job,
)
from core.jobs.repository import EVENT_LEVELS, EVENT_TYPES, add_event, get_job, get_steps

__all__ = ["EVENT_LEVELS", "EVENT_TYPES", "add_event", "cancel_job", "fine_tuned_model_name", "get_job",
           "get_steps", "pause_job", "remaining_step_indexes", "resume_job"]
