"""Jobs and their steps. A job of T steps has T `job_steps` rows, written with it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.clock import utcnow
from core.models.base import Base
from core.states import JobStatus, StepStatus


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created_at", "owner", "created_at"),
        Index("ix_jobs_status", "status"),
        # The reaper looks for ended jobs whose end transition is still due at every tick: a partial
        # index holds only the jobs without it (the active ones and those few), not the history.
        Index("ix_jobs_end_transition_due", "updated_at", postgresql_where=text("end_transition_at IS NULL"),
              sqlite_where=text("end_transition_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(255))  # what the user asked for, echoed back
    # The registered model the job starts from; its default_hyperparameters were applied.
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    # Set when the job branches from a checkpoint (named directly as `ftckpt-…`, or through a
    # fine-tuned model): step 1's policy and reference. Not a foreign key: checkpoints reference
    # jobs, and SQLite cannot create a cycle of keys.
    initial_checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    # The method as echoed to users: type, resolved hyperparameters, steps or partition.
    method: Mapped[dict]
    # Method-level resolved hyperparameters (a full StepConfig dict + learning_rate_multiplier).
    hyperparameters: Mapped[dict]
    # {"strategy", "n_steps", "source_field", "sizes"} when one file is split; None otherwise.
    partition: Mapped[dict | None]
    n_steps: Mapped[int]
    current_step: Mapped[int] = mapped_column(default=0)  # 0 until step 1 starts
    status: Mapped[str] = mapped_column(String(24), default=JobStatus.VALIDATING_FILES)
    error: Mapped[dict | None]  # {"code", "message", "param"}
    seed: Mapped[int]
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict | None] = mapped_column("metadata")
    # OpenAI's `integrations`, normalised by api/jobs/integrations.py: [{"type": "wandb"|"mlflow", …}].
    integrations: Mapped[list | None]
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    # A gated job's outcome (core/jobs/gates.py): {"status": "failed", "failed_step", "value", …} when
    # its gate stopped the chain, {"status": "passed", …} when every step passed; None without a gate.
    gate: Mapped[dict | None]
    trained_tokens: Mapped[int | None]
    estimated_finish: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # When the job's end transition was done (worker/flows.py, _job_ended: the stored trainer state
    # discarded, the integrations told). NULL while the job runs, and after its end until then: the
    # reaper finishes one that stays NULL (its sdpo.job_ended message lost, its worker dead mid-way).
    end_transition_at: Mapped[datetime | None]

    steps: Mapped[list[JobStep]] = relationship(
        back_populates="job", lazy="raise", order_by="JobStep.index", cascade="all, delete-orphan")


class JobStep(Base):
    __tablename__ = "job_steps"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        # The reaper's query: running steps whose heartbeat is stale.
        Index("ix_job_steps_status_heartbeat_at", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]  # 1-based
    status: Mapped[str] = mapped_column(String(24), default=StepStatus.PENDING)
    # The step's data: an uploaded file (dpo, sdpo steps form) or, for a partitioned job, a chunk
    # written by the worker's prepare task (chunk_uri in storage, chunk_stats like a file report's).
    training_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    chunk_uri: Mapped[str | None] = mapped_column(String(1024))
    chunk_stats: Mapped[dict | None]
    # Resolved StepConfig.to_dict() for this step (seed included): what the engine will run.
    hyperparameters: Mapped[dict]
    # sDPO: policy_init = reference = output of step k-1 (None for step 1 of a job started from a
    # registered model: the model itself is then both).
    reference_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    policy_init_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    output_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    attempt: Mapped[int] = mapped_column(default=0)
    # Attempts that failed or were lost (worker died, training process crashed; pauses do not count):
    # the retry budget, checked against max_step_attempts.
    failed_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # first_loss, mean_gamma_ref, last_loss, reward_accuracy, reward_margin, eval
    metrics: Mapped[dict | None]
    error: Mapped[dict | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="steps", lazy="raise")

