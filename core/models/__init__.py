"""Every ORM model, imported here so that Alembic and the mappers always see every table."""

from core.models.api_key import ApiKey
from core.models.base import Base
from core.models.checkpoint import Checkpoint
from core.models.event import Event
from core.models.file import File, FileStatus
from core.models.idempotency import IdempotencyKey
from core.models.job import Job, JobStep
from core.models.model import ModelSource, RegisteredModel
from core.models.webhook import Webhook, WebhookDelivery

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "Event",
    "File",
    "FileStatus",
    "IdempotencyKey",
    "Job",
    "JobStep",
    "ModelSource",
    "RegisteredModel",
    "Webhook",
    "WebhookDelivery",
]
