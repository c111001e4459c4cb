"""Models a job can start from: base models registered by an admin and fine-tuned outputs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from core.clock import utcnow
from core.models.base import Base


class ModelSource(StrEnum):
    LOCAL = "local"  # a Hugging Face directory on the server (config.json, weights, tokenizer)
    GGUF = "gguf"  # a .gguf file on the server; the worker converts it before training
    HUB = "hub"  # a Hugging Face hub id (reserved; the API does not register these yet)
    CHECKPOINT = "checkpoint"  # a fine-tuned output: a checkpoint of a succeeded job


class RegisteredModel(Base):
    __tablename__ = "models"

    # The name users pass as `model`: chosen by the admin for base models; for fine-tuned models
    # `ft:{base model}:{owner}:{suffix}:{job id}` (see core.jobs.fine_tuned_model_name).
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # None: system, visible to all
    source: Mapped[str] = mapped_column(String(16))
    # local/gguf: file:///absolute/path on the server; checkpoint: the checkpoint's storage uri.
    uri: Mapped[str] = mapped_column(String(1024))
    # Hyperparameter defaults for jobs on this model (StepConfig field names), e.g. a tiny test
    # model needs learning_rate 1e-3 while a 7B model wants 5e-7.
    default_hyperparameters: Mapped[dict] = mapped_column(default=dict)
    # Lineage of a fine-tuned model. Deliberately not foreign keys: jobs reference models, and
    # checkpoints reference jobs, so keys back from models would make a cycle that SQLite cannot
    # create without ALTER TABLE.
    job_id: Mapped[str | None] = mapped_column(String(40))
    checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by DELETE /v1/models/{id} (the owner's fine-tuned models only): the row stays, since jobs
    # name it as their model, but it is no longer listed or usable as a base.
    deleted_at: Mapped[datetime | None]
