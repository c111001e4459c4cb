"""One `Settings` object, read from `SDPO_*` environment variables once per process.

Every path default is derived from `home` so that the embedded mode (`sdpo up` on a laptop) needs
no configuration at all: SQLite database, SQLite-backed broker and local storage all live under
one folder. Production overrides `database_url`, `broker_url` and `storage_dir` and must set a
real admin key (refused otherwise, so a forgotten variable never exposes an open server).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sdpo_engine.protocol import TRAINING_SETTINGS

MIN_PRODUCTION_ADMIN_KEY_LENGTH = 32


class Settings(BaseSettings):
    """Configuration of the API and the worker. Build with `get_settings()` in a process, or
    `Settings(home=..., database_url=...)` explicitly (tests, tools)."""

    model_config = SettingsConfigDict(env_prefix="SDPO_", extra="ignore")

    home: Path = Field(Path(".sdpo"), description="Folder for every default path (made absolute).")
    # Defaults derived from `home` (the already validated field) so that the types say "always set".
    database_url: str = Field(
        default_factory=lambda data: f"sqlite:///{_home(data) / 'sdpo.db'}",
        description="SQLAlchemy URL; default sqlite:///{home}/sdpo.db. Postgres: postgresql+psycopg://…")
    broker_url: str = Field(
        # kombu wants four slashes before an absolute path: "sqla+sqlite:////abs/broker.db".
        default_factory=lambda data: f"sqla+sqlite:///{_home(data) / 'broker.db'}",
        description="Celery broker; default kombu's SQLAlchemy transport on {home}/broker.db.")
    storage_dir: Path = Field(
        default_factory=lambda data: _home(data) / "storage",
        description="Root of the local file store; default {home}/storage.")
    storage_url: str | None = Field(
        None, description="s3://bucket/prefix: uploads, chunks and checkpoints in an S3-compatible store (endpoint, "
        "region, credentials from the standard AWS variables, e.g. AWS_ENDPOINT_URL for MinIO); storage_dir then "
        "holds each host's work folders and download cache. Unset: the local folder storage_dir.")
    storage_cache_bytes: int = Field(
        50 << 30, gt=0, description="Most bytes of downloaded checkpoints a worker keeps in its local cache "
        "(S3 store only; least recently used go first).")
    admin_key: str | None = Field(None, description="Admin API key, registered (hashed) at API start-up.")
    environment: Literal["development", "production"] = "development"
    metrics_token: str | None = Field(
        None, description="If set, GET /metrics wants `Authorization: Bearer <token>`; unset, it is public "
        "(aggregate counts only).")

    max_upload_bytes: int = Field(1 << 30, gt=0, description="Largest accepted upload (413 above).")
    max_line_bytes: int = Field(1 << 20, gt=0, description="Longest accepted JSONL line.")
    max_reported_errors: int = Field(
        1000, gt=0, description="Problems listed in an upload's error report (error_count has the total).")
    max_file_rows: int = Field(1_000_000, gt=0, description="Most preference pairs (lines) in one upload.")
    max_metadata_pairs: int = Field(16, gt=0, description="Most key/value pairs in a job's metadata.")
    max_steps: int = Field(32, gt=0, description="Most sDPO steps one job may have.")
    max_active_jobs_per_owner: int = Field(
        16, ge=0, description="Most unfinished jobs (validating, queued, running, pausing or paused) one owner "
        "may have; a create beyond it gets 429 too_many_active_jobs. 0: no limit.")
    max_storage_bytes_per_owner: int = Field(
        50 << 30, ge=0, description="Most bytes of stored (not deleted) files one owner may have; an upload "
        "beyond it gets 413 storage_quota_exceeded, stopped as soon as its bytes pass the quota. 0: no limit.")
    max_files_per_owner: int = Field(
        10_000, ge=0, description="Most stored (not deleted) files one owner may have; an upload beyond it "
        "gets 429 too_many_files. 0: no limit.")
    max_uploads_per_minute: int = Field(
        60, ge=0, description="Most files one owner may create in any 60 s; an upload beyond it gets 429 "
        "upload_rate_limited with Retry-After. 0: no limit.")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="If set (os.pathsep-separated), POST /v1/models only accepts paths under these folders.")

    webhook_allowed_private_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Private webhook targets the admin allows (comma-separated): networks in CIDR form "
        "(10.0.0.0/8, 127.0.0.1, fd00::/8) and exact hostnames (receiver.internal). Webhooks are otherwise "
        "registered and sent to public addresses only (core/netguard.py).")
    mlflow_tracking_uri: str | None = Field(
        None, description="Worker: the MLflow tracking server of jobs whose mlflow integration gives no "
        "tracking_uri (any MLflow URI: http(s)://, file:, sqlite:); the worker's MLFLOW_TRACKING_USERNAME/"
        "PASSWORD/TOKEN are sent to it only. Unset: such jobs are refused (400).")
    docs_enabled: bool | None = Field(
        None, description="Serve the API docs (/docs, /redoc, /openapi.json); default: on, off in production.")

    db_pool_size: int = Field(20, gt=0, description="Database connections each API process keeps pooled.")
    db_max_overflow: int = Field(10, ge=0, description="Extra connections an API process may open under load.")
    api_max_concurrency: int = Field(
        24, gt=0, description="Requests one API process works on at once; more wait (without a thread or a "
        "connection) up to api_queue_seconds, then get 503 server_busy. Must stay below db_pool_size + "
        "db_max_overflow (see api/concurrency.py).")
    api_queue_seconds: float = Field(60.0, gt=0, description="How long a request waits for a slot.")
    max_streams_per_key: int = Field(
        8, ge=0, description="Live event streams (`…/events?stream=true`) one API key may hold open in one API "
        "process; one more gets 429 too_many_streams. 0: no limit.")
    upload_min_bytes_per_second: int = Field(
        16 * 1024, ge=0, description="Slowest request body (uploads, JSON) accepted once "
        "upload_rate_grace_seconds have passed: a body that falls behind this average rate, or sends "
        "nothing for upload_rate_grace_seconds, gets 408 request_timeout. 0: no minimum.")
    upload_rate_grace_seconds: float = Field(
        30.0, gt=0, description="Time a request body may take before the minimum rate applies, and the "
        "longest it may send nothing.")

    # For the worker (next issue); defined here so API and worker read the same values.
    step_heartbeat_seconds: float = Field(15.0, gt=0)
    step_stale_seconds: float = Field(120.0, gt=0)
    max_step_attempts: int = Field(3, ge=1)
    step_save_steps: int = Field(
        50, ge=0, description="Save a resumable trainer checkpoint every N optimizer steps (0: only on pause "
        "or stop). A step whose worker dies redoes at most the optimizer steps since the last save.")
    db_retry_seconds: float = Field(
        300.0, gt=0, description="How long the worker retries a database write (the database restarting) "
        "before giving up on it.")
    broker_visibility_timeout: int = Field(
        6 * 3600, gt=0, description="Seconds before Redis redelivers an unacked task: longer than any step.")

    warm_engine: bool = Field(
        True, description="Worker: keep one engine process started ahead of the next step, so a step does not "
        "wait for torch/transformers/TRL to import (about 8 s on 2 cores; ~0.5 GB of memory while it waits).")

    # How a step trains on this machine: passed into every step's spec (sdpo_engine.protocol.StepSpec, which
    # the engine reads; it reads no environment variable) and recorded in the checkpoint's manifest.
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Worker: the device a step trains on; auto: cuda if available, else cpu.")
    packing: bool = Field(
        True, description="Engine: shared-prompt packing where proven identical for the model (auto/on); "
        "off: TRL's two sequences per pair (same loss, slower).")
    pack_tokens: int | None = Field(
        None, ge=0, le=65536, description="Engine: with packing, several whole pairs per packed row of at most this "
        "many tokens (block-diagonal attention, no padding between pairs); unset: the engine's default "
        "(sdpo_engine.packing.DEFAULT_PACK_TOKENS); 0: one pair per row. Same loss either way.")
    group_by_length: bool = Field(
        False, description="Engine: batches of pairs of similar length (each epoch still every pair once, same "
        "batch sizes; less padding); off: TRL's order of the pairs exactly.")
    reference_batch_size: int | None = Field(
        None, ge=1, le=4096, description="Engine: pairs per batch of the reference pass (no gradients, so "
        "larger fits); unset: the engine's, max(batch_size, 8). Same reference log-probs.")
    pad_to_multiple_of: int | None = Field(
        None, ge=0, le=4096, description="Engine: round each batch's length up to this (fewer tensor shapes for "
        "the GPU's attention kernels); unset: 64 on a GPU, none on CPU; 0: no rounding.")
    activation_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Engine: auto turns activation checkpointing on only where the largest batch's "
        "activations would not fit in memory; on/off force it.")
    param_dtype: Literal["auto", "float32", "bfloat16", "bfloat16-master", "bfloat16-sr"] = Field(
        "auto", description="Engine: the weights' dtype. auto: float32 weights with bf16 autocast on a GPU that "
        "has bf16 (float32 on CPU); float32: float32 throughout; bfloat16: the policy, its reference pass and "
        "AdamW's states in bf16 (pure bf16: half the memory; at DPO's learning rates most updates are lost); "
        "bfloat16-master: bf16 weights, AdamW over float32 masters; bfloat16-sr: bf16 weights, torchao's stochastic "
        "rounding (the perf extra). Checkpoints of the bf16 settings are saved in bf16.")
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="Engine: the policy's attention. auto: the model's default (sdpa where transformers has "
        "it); sdpa; flex: torch's FlexAttention with a block mask over the packed rows (CUDA and packing only). "
        "Same loss either way.")
    compile: Literal["off", "layers"] = Field(
        "off", description="Engine: layers compiles each decoder layer with torch.compile (one graph the layers "
        "share; the step's first batches pay the compile time); off: eager. Same loss either way.")
    # A step on N ranks (sdpo_engine.distributed; docs/SCALING.md): the spec's `distributed`.
    worker_gpus: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="Worker: the GPUs it owns (indices, comma-separated: 0,1,2,3); each step "
        "runs on all of them, one rank per GPU (its engine's CUDA_VISIBLE_DEVICES), so several workers on one "
        "host split the GPUs. Unset: one process on the default device.")
    worker_ranks: int | None = Field(
        None, ge=1, le=1024, description="Worker: ranks of each step; on CPU that many gloo ranks. Default: the "
        "number of worker_gpus, else 1. Must equal that number when both are set.")
    distributed_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Worker: how a step's ranks split the model: ddp (a whole copy on every rank) or fsdp "
        "(FSDP2: weights, gradients and optimizer states sharded across the ranks).")

    light_queue: str = "sdpo.light"
    train_queue: str = "sdpo.train"

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_auto(cls, value):
        # "auto" was SDPO_PACKING's documented default: packing where proven identical, i.e. on.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return True
        return value

    @field_validator("pad_to_multiple_of", "pack_tokens", "reference_batch_size", mode="before")
    @classmethod
    def _pad_unset(cls, value):
        if isinstance(value, str) and value.strip().lower() in ("", "auto"):
            return None
        return value

    @field_validator("worker_gpus", mode="before")
    @classmethod
    def _split_gpus(cls, value):
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if not all(part.isdigit() for part in parts):
                raise ValueError("SDPO_WORKER_GPUS must be GPU indices separated by commas, e.g. 0,1,2,3")
            return [int(part) for part in parts]
        return value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("webhook_allowed_private_networks", mode="before")
    @classmethod
    def _split_networks(cls, value):
        from core.netguard import Allowance  # imports httpx: only when there is something to check

        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if value:
            Allowance.parse(value)  # a ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if self.docs_enabled is None:
            self.docs_enabled = self.environment != "production"
        self.home = _home({"home": self.home})
        self.storage_dir = self.storage_dir.expanduser().resolve()
        self.model_roots = [p.expanduser().resolve() for p in self.model_roots]
        if self.worker_gpus and len(set(self.worker_gpus)) != len(self.worker_gpus):
            raise ValueError("SDPO_WORKER_GPUS names a GPU twice")
        if self.worker_gpus and self.worker_ranks is not None and self.worker_ranks != len(self.worker_gpus):
            raise ValueError(f"SDPO_WORKER_RANKS={self.worker_ranks} but SDPO_WORKER_GPUS names "
                             f"{len(self.worker_gpus)} GPUs: one rank per GPU")
        if self.api_max_concurrency >= self.db_pool_size + self.db_max_overflow:
            raise ValueError("SDPO_API_MAX_CONCURRENCY must be below SDPO_DB_POOL_SIZE + SDPO_DB_MAX_OVERFLOW: "
                             "a request holds a connection between its thread-pool calls (api/concurrency.py)")
        if self.environment == "production":
            if not self.admin_key:
                raise ValueError("SDPO_ADMIN_KEY must be set when SDPO_ENVIRONMENT=production")
            if len(self.admin_key) < MIN_PRODUCTION_ADMIN_KEY_LENGTH:
                raise ValueError(
                    f"SDPO_ADMIN_KEY must be at least {MIN_PRODUCTION_ADMIN_KEY_LENGTH} characters in production")
        return self

    @property
    def step_ranks(self) -> int:
        """Ranks each step of this worker runs on: the GPUs it owns, else `worker_ranks`, else 1."""
        return len(self.worker_gpus) or self.worker_ranks or 1

    def step_distributed(self) -> dict[str, int | str] | None:
        """The step spec's `distributed` (sdpo_engine.protocol.DistributedSpec); None for one rank."""
        if self.step_ranks <= 1:
            return None
        return {"num_processes": self.step_ranks, "strategy": self.distributed_strategy}

    def training_settings(self) -> dict[str, Any]:
        """The step spec's training settings from this worker's (sdpo_engine.protocol.TRAINING_SETTINGS:
        passed in every step's spec, checked at a training worker's start)."""
        return {name: getattr(self, name) for name in TRAINING_SETTINGS}

    def engine_environment(self) -> dict[str, str] | None:
        """What the worker adds to its engine processes' environment: the GPUs it owns."""
        if not self.worker_gpus:
            return None
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in self.worker_gpus)}

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")


def _home(data: dict[str, Any]) -> Path:
    """The absolute `home` from a Settings' validated fields (the default when `home` was invalid)."""
    return Path(data.get("home", ".sdpo")).expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
