"""Request and response shapes of /v1/fine_tuning/jobs.

Requests are validated with these models (unknown fields refused at every level); responses
follow OpenAI's objects, with sDPO extensions added as extra fields that OpenAI's SDK keeps.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from core.clock import to_unix
from core.jobs import fine_tuned_model_name
from core.models import Checkpoint, Event, Job, JobStep
from core.text import clean_optional_name

# ------------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_TEXT_FORMAT = ("chat (default): message lists go through the model's chat template, and chat markup or the "
                "tokenizer's special tokens inside the text are refused; raw: prompt/chosen/rejected strings are "
                "already formatted and are trained exactly as given, never templated (BOS and EOS added at most "
                "once).")
_CHAT_TEMPLATE = ("A Jinja chat template used instead of the model's own (needed for message lists on a model "
                  "without one); saved with every checkpoint of the job.")


class SamplesSettings(_Strict):
    n_prompts: StrictInt = Field(description="K: answer the first K prompts of the validation file (1 to 32).")
    max_new_tokens: StrictInt = Field(48, description="Longest answer, in tokens (1 to 512).")


_SAMPLES = ("Per-step samples: after every step, greedy answers (seeded) to the validation file's first n_prompts "
            "prompts, generated in the step's process; step 1 also answers with the base model before training. "
            "Read them at GET /v1/fine_tuning/jobs/{id}/steps/{index}/samples. Needs validation_file.")


class DpoSpec(_Strict):
    hyperparameters: dict[str, Any] | None = Field(
        None, description="beta, learning_rate or learning_rate_multiplier, n_epochs, batch_size, max_length, "
                          "…: numbers or \"auto\". Loss: loss_type (a TRL loss name or a list), loss_weights, "
                          "rpo_alpha, label_smoothing, ld_alpha, discopop_tau (docs/CONTRACTS.md).")
    text_format: StrictStr | None = Field(None, description=_TEXT_FORMAT)
    chat_template: StrictStr | None = Field(None, description=_CHAT_TEMPLATE)
    samples: SamplesSettings | None = Field(None, description=_SAMPLES)


class SdpoStepSpec(_Strict):
    training_file: StrictStr
    hyperparameters: dict[str, Any] | None = Field(None, description="Overrides of the method's hyperparameters.")


class PartitionSpec(_Strict):
    strategy: StrictStr = Field(description="random, stratified, easy_to_hard, hard_to_easy or pair_easy_to_hard "
                                            "(pairs ordered by gamma under the model, no source needed).")
    n_steps: StrictInt = Field(description="T: the number of chunks (steps).")
    source_field: StrictStr | None = Field(None, description="Field naming each pair's source (default source).")
    sizes: list[StrictInt] | None = Field(None, description="Rows per chunk (random/stratified/pair_easy_to_hard), "
                                                            "summing to rows.")
    rescore: StrictBool | None = Field(None, description="pair_easy_to_hard: before step t > 1, order the pairs not yet "
                                                   "trained by M_{t-1}'s gamma (default false).")


class GateSpec(_Strict):
    """What must hold after each step on the validation file (core/jobs/gates.py)."""

    metric: StrictStr = Field(description="eval.reward_accuracy, eval.preference_accuracy or eval.reward_margin: "
                                          "the step's held-out value (against the base model) compared with the "
                                          "previous step's (step 1: with the base's).")
    min_delta: float = Field(0.0, description="The gate fails when value − previous < min_delta.")
    on_fail: StrictStr = Field("stop", description="stop: the failing step is the job's result; rollback: the "
                                                   "best step so far by the metric is.")
    max_drift: float | None = Field(None, description="Also fail when the step's drift from the base, "
                                                      "drift.max_abs_per_token (nats per token), exceeds this.")


class SdpoSpec(_Strict):
    hyperparameters: dict[str, Any] | None = None
    steps: list[SdpoStepSpec] | None = Field(None, description="One uploaded file per step (as in the paper).")
    partition: PartitionSpec | None = Field(None, description="Or: split training_file into n_steps chunks.")
    text_format: StrictStr | None = Field(None, description=_TEXT_FORMAT)
    chat_template: StrictStr | None = Field(None, description=_CHAT_TEMPLATE)
    gate: GateSpec | None = Field(None, description="Step gate (needs validation_file): after each step the "
                                                    "held-out metric must not regress; on a failure the chain "
                                                    "stops and the job succeeds with the gate's result.")
    samples: SamplesSettings | None = Field(None, description=_SAMPLES)


class MethodSpec(_Strict):
    type: StrictStr = Field(description="dpo (one step) or sdpo (stepwise).")
    dpo: DpoSpec | None = None
    sdpo: SdpoSpec | None = None
    # OpenAI's other methods, accepted in shape only to answer `unsupported_method`.
    supervised: Any = None
    reinforcement: Any = None


class JobCreate(_Strict):
    model: StrictStr
    training_file: StrictStr | None = None
    validation_file: StrictStr | None = None
    hyperparameters: dict[str, Any] | None = Field(None, description="OpenAI's deprecated form of "
                                                   "method.dpo.hyperparameters (used when method is absent).")
    method: MethodSpec | None = None
    seed: StrictInt | None = None
    suffix: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    integrations: list[Any] | None = Field(
        None, description="OpenAI's: [{\"type\": \"wandb\", \"wandb\": {\"project\", \"entity\", \"name\", \"tags\"}}], "
        "or {\"type\": \"mlflow\", \"mlflow\": {\"tracking_uri\", \"experiment_name\", \"run_name\"}}; the worker logs "
        "each step to them (W&B offline, into the server's storage). See docs/CONTRACTS.md.")

    # Invisible characters go before the suffix's own check (api/jobs/spec.py): see core/text.py.
    _clean_suffix = field_validator("suffix")(clean_optional_name)


# ------------------------------------------------------------------------------------------------
# Responses: each model builds itself from its row (`from_row`); services and routes hand the model
# to FastAPI (response_model) or to api.idempotency.respond, which serialise it.


OPENAI_HYPERPARAMETERS = ("batch_size", "learning_rate_multiplier", "n_epochs", "beta")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobProgress(BaseModel):
    """Where the job is (see api.jobs.progress)."""

    step: int = Field(description="The sDPO step k running or last run (0 before step 1 starts).")
    n_steps: int = Field(description="T, the job's number of steps.")
    step_status: str | None
    global_step: int | None = Field(description="Optimizer steps done in step k.")
    max_steps: int | None = Field(description="Optimizer steps of step k.")
    percent: float
    tokens_per_second: float | None
    eta_seconds: int | None
    queue_position: int | None = Field(description="1 = next, while the job waits for a worker.")


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    estimated_finish: int | None
    integrations: list[Any]
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None
    # Extensions
    n_steps: int
    current_step: int
    started_at: int | None
    updated_at: int | None
    progress: JobProgress | None = None
    gate: dict[str, Any] | None = Field(None, description="A gated job's outcome: {status: failed, failed_step, "
                                                          "reason, metric, value, previous, delta, drift, "
                                                          "on_fail, result_step, result_checkpoint, rolled_back, "
                                                          "fine_tuned_model} or {status: passed, …}; null "
                                                          "without a gate or before the job ends.")

    @classmethod
    def from_row(cls, job: Job, progress: dict[str, Any] | JobProgress | None = None) -> JobObject:
        """The job as OpenAI's `fine_tuning.job`; `progress` from api.jobs.progress.job_progress.
        `estimated_finish` is the stored one, else now + the progress's `eta_seconds`."""
        progress = JobProgress.model_validate(progress) if progress is not None else None
        estimated_finish = to_unix(job.estimated_finish)
        if estimated_finish is None and progress is not None and progress.eta_seconds is not None:
            estimated_finish = int(time.time()) + progress.eta_seconds
        hp = job.hyperparameters or {}
        return cls(
            id=job.id, created_at=to_unix(job.created_at), finished_at=to_unix(job.finished_at), model=job.model,
            fine_tuned_model=job.fine_tuned_model, organization_id=job.owner, status=job.status,
            hyperparameters={k: hp.get(k) for k in OPENAI_HYPERPARAMETERS}, training_file=job.training_file_id,
            validation_file=job.validation_file_id, result_files=[], trained_tokens=job.trained_tokens,
            error=JobError.model_validate(job.error) if job.error is not None else None, seed=job.seed, estimated_finish=estimated_finish,
            integrations=job.integrations or [],
            metadata=job.metadata_, method=job.method, user_provided_suffix=job.suffix, n_steps=job.n_steps,
            current_step=job.current_step, started_at=to_unix(job.started_at), updated_at=to_unix(job.updated_at),
            progress=progress, gate=job.gate)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool

    @classmethod
    def from_rows(cls, jobs: list[Job], progress: dict[str, dict[str, Any]], *, has_more: bool) -> JobList:
        """`progress` by job id, as api.jobs.progress.job_progress gives it."""
        return cls(data=[JobObject.from_row(j, progress[j.id]) for j in jobs], has_more=has_more)


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str
    step: int | None

    @classmethod
    def from_row(cls, event: Event) -> EventObject:
        return cls(id=event.id, created_at=to_unix(event.created_at), level=event.level, message=event.message,
                   data=event.data, type=event.type, step=event.step_index)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool

    @classmethod
    def from_rows(cls, events: list[Event], *, has_more: bool) -> EventList:
        return cls(data=[EventObject.from_row(e) for e in events], has_more=has_more)


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    step_index: int
    sha256: str | None
    bytes: int | None

    @classmethod
    def from_row(cls, checkpoint: Checkpoint, job: Job) -> CheckpointObject:
        metrics = dict(checkpoint.metrics or {})
        # OpenAI's checkpoint metrics keys, filled from the step summary where one exists.
        metrics.setdefault("step", checkpoint.step_index)
        if "train_loss" not in metrics and metrics.get("last_loss") is not None:
            metrics["train_loss"] = metrics["last_loss"]
        return cls(
            id=checkpoint.id, created_at=to_unix(checkpoint.created_at),
            fine_tuned_model_checkpoint=f"{fine_tuned_model_name(job)}:ckpt-step-{checkpoint.step_index}",
            fine_tuning_job_id=checkpoint.job_id, metrics=metrics,
            # OpenAI counts optimizer steps here; an sDPO checkpoint is the end of an sDPO step.
            step_number=checkpoint.step_index, step_index=checkpoint.step_index, sha256=checkpoint.sha256,
            bytes=checkpoint.bytes)


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def page(cls, checkpoints: list[Checkpoint], job: Job, *, has_more: bool) -> CheckpointList:
        """A page of `job`'s checkpoints, with OpenAI's first_id/last_id."""
        return cls(data=[CheckpointObject.from_row(c, job) for c in checkpoints], has_more=has_more,
                   first_id=checkpoints[0].id if checkpoints else None,
                   last_id=checkpoints[-1].id if checkpoints else None)


class StepMetrics(BaseModel):
    """A succeeded step's summary (the training process's `result`; null before then). These keys
    always appear, first; the rest of the summary (pairs, pairs_used, pairs_dropped,
    train_seconds, global_steps, output, reference, …) follows as recorded."""

    model_config = ConfigDict(extra="allow")

    first_loss: float | None = Field(None, description="The DPO loss of the first optimizer step (ln 2 = "
                                                       "0.6931 when policy and reference start equal).")
    mean_gamma_ref: float | None = Field(None, description="Mean reference log-ratio "
                                                           "log π_ref(chosen|x) − log π_ref(rejected|x) over the "
                                                           "step's pairs (nats).")
    last_loss: float | None = Field(None, description="The DPO loss of the last optimizer step.")
    reward_accuracy: float | None = Field(None, description="Share of pairs whose implicit reward prefers "
                                                            "chosen, mean over the last epoch (0..1).")
    reward_margin: float | None = Field(None, description="Mean implicit reward margin, chosen − rejected, "
                                                          "over the last epoch.")
    eval: dict[str, Any] | None = Field(None, description="Held-out metrics on the validation file "
                                                          "(pairs, reward_accuracy, reward_margin, "
                                                          "preference_accuracy, mean_gamma), when one was given.")
    drift: dict[str, Any] | None = Field(None, description="Drift from the base model on the validation pairs "
                                                           "(sdpo_engine/drift.py): pairs, chosen_logratio, "
                                                           "rejected_logratio (mean nats per answer), "
                                                           "chosen_logratio_per_token, rejected_logratio_per_token "
                                                           "(nats per token), reward_margin (β-scaled, vs the "
                                                           "base), max_abs_per_token, base_preference_accuracy.")


class ChunkSummary(BaseModel):
    """A partitioned job's chunk for one step (its storage location stays internal)."""

    stats: dict[str, Any] | None = Field(description="Rows, sources and lengths of the chunk.")
    rows: int | None


class StepObject(BaseModel):
    object: Literal["fine_tuning.job.step"] = "fine_tuning.job.step"
    index: int
    status: str
    training_file: str | None
    chunk: ChunkSummary | None
    reference_checkpoint: str | None
    policy_init_checkpoint: str | None
    output_checkpoint: str | None
    hyperparameters: dict[str, Any]
    metrics: StepMetrics
    attempt: int
    error: dict[str, Any] | None
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def from_row(cls, step: JobStep) -> StepObject:
        chunk = None
        if step.chunk_stats is not None or step.chunk_uri is not None:
            chunk = ChunkSummary(stats=step.chunk_stats, rows=(step.chunk_stats or {}).get("rows"))
        return cls(
            index=step.index, status=step.status, training_file=step.training_file_id, chunk=chunk,
            reference_checkpoint=step.reference_checkpoint_id, policy_init_checkpoint=step.policy_init_checkpoint_id,
            output_checkpoint=step.output_checkpoint_id, hyperparameters=dict(step.hyperparameters or {}),
            metrics=StepMetrics.model_validate(_without_samples(step.metrics)), attempt=step.attempt, error=step.error,
            created_at=to_unix(step.created_at), started_at=to_unix(step.started_at),
            finished_at=to_unix(step.finished_at))


def _without_samples(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A step's metrics with the samples' generation time only (the texts: the samples endpoint)."""
    metrics = dict(metrics or {})
    samples = metrics.pop("samples", None)
    if isinstance(samples, dict):
        metrics["samples_seconds"] = samples.get("seconds")
    return metrics


class StepSamples(BaseModel):
    """GET /v1/fine_tuning/jobs/{id}/steps/{index}/samples: the step's greedy answers to the validation
    file's first prompts (sdpo_engine/samples.py), and step 1's base-model answers before training."""

    object: Literal["fine_tuning.job.step.samples"] = "fine_tuning.job.step.samples"
    index: int
    output_checkpoint: str | None
    prompts: list[str]
    answers: list[str]
    base_answers: list[str] | None = Field(description="The base model's answers (step 1 only), before training.")
    max_new_tokens: int
    seed: int
    seconds: float = Field(description="Generation after training, in the step's time.")
    base_seconds: float | None

    @classmethod
    def from_row(cls, step: JobStep) -> StepSamples:
        s = (step.metrics or {})["samples"]
        return cls(index=step.index, output_checkpoint=step.output_checkpoint_id, prompts=s["prompts"],
                   answers=s["answers"], base_answers=s.get("base_answers"), max_new_tokens=s["max_new_tokens"],
                   seed=s["seed"], seconds=s["seconds"], base_seconds=s.get("base_seconds"))


class StepList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StepObject]
    has_more: bool

    @classmethod
    def from_rows(cls, steps: list[JobStep]) -> StepList:
        """Every step of a job, in order (one page: a job has at most SDPO_MAX_STEPS)."""
        return cls(data=[StepObject.from_row(s) for s in steps], has_more=False)
