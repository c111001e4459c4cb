"""Request and response shapes of /v1/models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from core.clock import to_unix
from core.models import RegisteredModel


class ModelRegister(BaseModel):
    """Admin only: register a model that is already on the server's disk."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(description="The name jobs will use, e.g. `tiny-llama` (letters, digits, . _ -).")
    path: StrictStr = Field(description="Absolute path on the server: a Hugging Face directory or a .gguf file.")
    format: Literal["hf", "gguf"] = "hf"
    default_hyperparameters: dict[str, Any] | None = Field(
        None, description="Defaults for jobs on this model (StepConfig names), e.g. {\"learning_rate\": 1e-3}.")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions
    source: str
    default_hyperparameters: dict[str, Any]
    fine_tuning_job_id: str | None = None

    @classmethod
    def from_row(cls, row: RegisteredModel) -> ModelObject:
        # The server path (uri) is deliberately absent: nothing but an admin names server paths.
        return cls(id=row.id, created=to_unix(row.created_at), owned_by=row.owner or "system", source=row.source,
                   default_hyperparameters=row.default_hyperparameters or {}, fine_tuning_job_id=row.job_id)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    """OpenAI's `ModelDeleted`."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool
