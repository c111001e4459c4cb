"""The API's job queries: they live in core.jobs.repository, shared with the worker."""

from core.jobs.repository import (
    checkpoints_page,
    count_active,
    events_page,
    get_checkpoint,
    get_checkpoint_by_id,
    get_event,
    get_job,
    get_model,
    list_page,
    lock_owner_jobs,
    owned_checkpoint,
)

__all__ = ["checkpoints_page", "count_active", "events_page", "get_checkpoint", "get_checkpoint_by_id", "get_event",
           "get_job", "get_model", "list_page", "lock_owner_jobs", "owned_checkpoint"]
