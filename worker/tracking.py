"""Experiment tracking: a job's `integrations` (api/jobs/integrations.py) written from what the job
already recorded, by the worker process, after each step and when the job ends.

The worker calls `step_succeeded` once a step's checkpoint is recorded and `job_ended` when the
job ends: it succeeded, failed, or was cancelled while a step ran (worker/flows.py). A job cancelled
while no step ran (queued, paused, between two steps) has no worker to see it: the cancel
(core.jobs.lifecycle.cancel_job) sends task `sdpo.job_ended`, and a light worker runs the job's end
transition for it (worker/flows.py: end_job), which calls `job_ended`. Each call reads the job from the database (the step rows,
their checkpoints and the per-optimizer-step `metrics` events the relay wrote) and sends it to each
integration; on Postgres the calls for one job take turns (an advisory lock), so a cancel's task
and the worker that stopped the running step never both create the job's MLflow run. So the
training child never talks to a tracker (it needs no network to one, and a slow tracker never
slows training), and what is tracked is exactly what the job's log says, backfilled metrics of a
resumed attempt included.

A tracker that fails (down, refused, slow, a bad setting) never fails the step or the job: the
failure becomes a `warn` event on the job (data `{"integration", "error"}`) and training goes on.
Each call writes every succeeded step that is not yet tracked, so a step missed while a tracker
was away is written by the next call.

- **wandb** (OpenAI's shape): one W&B run per job (id = the job id), written in W&B's offline mode
  (no W&B server is called; `wandb sync DIR` uploads it later with the host's own credentials)
  into `{SDPO_STORAGE_DIR}/tracking/wandb/{job id}/wandb/offline-run-*-{job id}/`. The run's step
  axis (`_step`) is the optimizer step counted across the job; each row also carries `sdpo_step`
  (k) and `global_step` (within step k). Train metrics are `train/<TRL name>`; each step's results
  `step/<name>` (first_loss, last_loss, mean_gamma_ref, reward_accuracy, reward_margin, pairs,
  pairs_used, train_seconds), held-out ones `eval/<name>` and the policy's drift from the job's
  base model on the held-out pairs `drift/<name>` (sdpo_engine/drift.py: pairs, chosen_logratio,
  rejected_logratio in nats per answer, chosen_logratio_per_token, rejected_logratio_per_token,
  max_abs_per_token in nats per token, reward_margin, base_preference_accuracy), at the step's
  last optimizer step.
  The config holds the job's settings and, per step, its hyperparameters and lineage
  (`steps.<k>.reference_checkpoint`, `…reference_sha256`, `…output_checkpoint`, `…output_sha256`);
  the summary has `final_checkpoint`, `final_checkpoint_sha256` and `fine_tuned_model` once the
  job succeeded. The run is rewritten whole after each step (written to a new folder, then swapped
  in), so the folder always holds one complete run, never one session per step.
- **mlflow**: one parent run per job (tag `sdpo.job_id`, name `run_name` or the job id) in
  `experiment_name` (default `sdpo`); one nested run per step (tags `mlflow.parentRunId`,
  `sdpo.step`; name `step-k`) with the step's hyperparameters as params, its metrics per optimizer
  step (MLflow step = global_step), its results (`step/…`, `eval/…`, `drift/…`, as for W&B), and
  its lineage as tags
  (`sdpo.reference_checkpoint`, `sdpo.reference_sha256`, `sdpo.policy_init_checkpoint`,
  `sdpo.output_checkpoint`, `sdpo.output_sha256`; step 1 of a job on a registered model has
  `sdpo.reference_model` instead). The parent has the job's params, each step's results as
  metrics at MLflow step k, and, when the job ends, tag `sdpo.status` and status FINISHED (with
  tags `sdpo.final_checkpoint`, `sdpo.final_checkpoint_sha256` and `sdpo.fine_tuned_model`),
  FAILED or KILLED. The tracking URI
  is the job's or `SDPO_MLFLOW_TRACKING_URI`. The worker's MLflow credentials
  (`MLFLOW_TRACKING_USERNAME`/`PASSWORD`/`TOKEN`) are sent to the server default only; a
  job-supplied URI is checked again here (every address its host resolves to must be public or
  allowed by `SDPO_WEBHOOK_ALLOWED_PRIVATE_NETWORKS`), and calls give up after
  `MLFLOW_HTTP_REQUEST_TIMEOUT` (default here 10 s) and `MLFLOW_HTTP_REQUEST_MAX_RETRIES` (2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from core.jobs import repository
from core.jobs.repository import add_event
from core.settings import Settings, get_settings
from worker import db

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "sdpo"
JOB_TAG, KIND_TAG, STEP_TAG = "sdpo.job_id", "sdpo.kind", "sdpo.step"
# Keys of a metrics event that are coordinates or flags, not measurements.
_NOT_METRICS = {"step", "global_step", "max_steps", "backfilled"}
_STEP_RESULTS = ("first_loss", "last_loss", "mean_gamma_ref", "reward_accuracy", "reward_margin", "pairs",
                 "pairs_used", "train_seconds", "global_steps", "num_tokens")
_MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                       "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH")
_ENDED = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}  # job status -> MLflow run status
_PATH = re.compile(r"(/[^\s:'\"]+){2,}")  # server paths stay out of the events users read


# ----------------------------------------------------------------------------------------------
# What the job recorded


@dataclass
class StepRecord:
    index: int
    hyperparameters: dict[str, Any]
    results: dict[str, Any]  # the step's metrics column: first_loss, …, eval
    lineage: dict[str, str | None]
    optimizer_steps: list[dict[str, Any]] = field(default_factory=list)  # metrics events' data, in order


@dataclass
class JobRecord:
    id: str
    model: str
    status: str
    n_steps: int
    params: dict[str, Any]
    integrations: list[dict[str, Any]]
    steps: list[StepRecord]  # the succeeded ones, in order
    final: dict[str, str | None] | None  # once succeeded: final checkpoint, its sha256, the model name


def read_job(session: Session, job_id: str) -> JobRecord | None:
    """The job as the trackers see it, or None when it has no integrations."""
    job = repository.get_job(session, job_id)
    if job is None or not job.integrations:
        return None
    steps = repository.succeeded_steps(session, job_id)
    ids = {i for s in steps for i in (s.reference_checkpoint_id, s.policy_init_checkpoint_id,
                                       s.output_checkpoint_id) if i}
    sha = repository.checkpoint_sha256s(session, ids)
    events = repository.metrics_events(session, job_id)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e.step_index is not None and isinstance(e.data, dict) and isinstance(e.data.get("global_step"), int):
            by_step.setdefault(e.step_index, []).append(e.data)
    records = []
    for s in steps:
        lineage: dict[str, str | None] = {
            "reference_checkpoint": s.reference_checkpoint_id, "reference_sha256": sha.get(s.reference_checkpoint_id or ""),
            "policy_init_checkpoint": s.policy_init_checkpoint_id,
            "output_checkpoint": s.output_checkpoint_id, "output_sha256": sha.get(s.output_checkpoint_id or "")}
        if s.reference_checkpoint_id is None:
            lineage["reference_model"] = job.model_id  # step 1 on a registered model: the model is the reference
        # One entry per optimizer step (a resumed attempt's events do not repeat; keep the first anyway).
        seen: dict[int, dict[str, Any]] = {}
        for data in by_step.get(s.index, []):
            seen.setdefault(data["global_step"], data)
        records.append(StepRecord(s.index, dict(s.hyperparameters or {}), dict(s.metrics or {}), lineage,
                                  [seen[g] for g in sorted(seen)]))
    final = None
    if job.status == "succeeded" and records:
        last = records[-1].lineage
        final = {"final_checkpoint": last["output_checkpoint"], "final_checkpoint_sha256": last["output_sha256"],
                 "fine_tuned_model": job.fine_tuned_model}
    params = {"model": job.model, "method": (job.method or {}).get("type"), "n_steps": job.n_steps, "seed": job.seed,
              "training_file": job.training_file_id, "validation_file": job.validation_file_id,
              "suffix": job.suffix, **{f"hp.{k}": v for k, v in (job.hyperparameters or {}).items()}}
    if job.partition:
        params.update({f"partition.{k}": v for k, v in job.partition.items() if k != "sizes"})
    return JobRecord(job.id, job.model, job.status, job.n_steps, params, list(job.integrations), records, final)


# ----------------------------------------------------------------------------------------------
# Entry points (called by worker/flows.py; never raise)


def step_succeeded(job_id: str, index: int, settings: Settings) -> None:
    """Track the job's succeeded steps after step `index` was recorded."""
    _track(job_id, index, settings)


def job_ended(job_id: str, settings: Settings | None = None) -> None:
    """Track the job's end: its final checkpoint once it succeeded; a failed or cancelled job's
    runs are closed as such (MLflow FAILED / KILLED). Nothing for a job that has not ended.
    `settings`: the worker's (`get_settings()` when not given)."""
    _track(job_id, None, settings or get_settings())


def _track(job_id: str, index: int | None, settings: Settings) -> None:
    try:
        with db.session() as s:
            if _take_turn(s, job_id):  # held until this session ends: read and write in turn
                _write_all(read_job(s, job_id), index, settings)
                return
            job = read_job(s, job_id)
    except Exception:  # the database away: tracking is not worth failing the step for
        log.warning("tracking of %s: the job could not be read", job_id, exc_info=True)
        return
    _write_all(job, index, settings)


def _take_turn(session: Session, job_id: str) -> bool:
    """Postgres: wait for the job's other tracking call (a cancel's `sdpo.job_ended` task and the
    worker that stopped the running step both end the job's runs) and hold a transaction-scoped
    advisory lock until `session` ends; True. SQLite: False, nothing taken (its transactions hold
    the one write lock, so none may stay open across a tracker's I/O; the embedded mode's single
    worker process runs one task at a time anyway)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"tracking:{job_id}"})
    return True


def _write_all(job: JobRecord | None, index: int | None, settings: Settings) -> None:
    """Send `job` to each of its integrations (a failure is a warn event); nothing for no job, or
    for the end (`index` None) of a job that has not ended. Never raises."""
    if job is None or (index is None and job.status not in _ENDED):
        return
    job_id = job.id
    for integration in job.integrations:
        kind = integration.get("type")
        try:
            if kind == "wandb":
                write_wandb(job, integration["wandb"], settings)
            elif kind == "mlflow":
                write_mlflow(job, integration["mlflow"], settings)
        except Exception as exc:
            log.warning("tracking of %s to %s failed", job_id, kind, exc_info=True)
            _warn(job_id, index, str(kind), exc)


def _warn(job_id: str, index: int | None, kind: str, exc: BaseException) -> None:
    first_line = (str(exc).splitlines() or [""])[0][:300]
    error = f"{type(exc).__name__}: {_PATH.sub('<path>', first_line)}"
    where = f"Step {index}: warning: " if index is not None else "Warning: "
    try:
        with db.session() as s:
            add_event(s, job_id, f"{where}the {kind} integration could not be written ({error}); training goes on.",
                      level="warn", step_index=index, data={"integration": kind, "error": error})
    except Exception:
        log.warning("tracking of %s: the warning event could not be written", job_id, exc_info=True)


def _numbers(values: dict[str, Any], skip: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if k not in skip and isinstance(v, int | float)
            and not isinstance(v, bool) and math.isfinite(v)}


def _step_results(step: StepRecord) -> dict[str, float]:
    """`step/<name>`, `eval/<name>` and `drift/<name>` of a step's results (the numbers only: a
    step without a held-out set has no eval and no drift)."""
    out = {f"step/{k}": v for k, v in _numbers({k: step.results.get(k) for k in _STEP_RESULTS}).items()}
    for group in ("eval", "drift"):
        values = step.results.get(group)
        if isinstance(values, dict):
            out.update({f"{group}/{k}": v for k, v in _numbers(values).items()})
    return out


# ----------------------------------------------------------------------------------------------
# W&B (offline)


def wandb_dir(settings: Settings, job_id: str) -> Path:
    """The folder whose `wandb/offline-run-*-{job_id}` is the job's W&B run."""
    return Path(settings.storage_dir) / "tracking" / "wandb" / job_id


def write_wandb(job: JobRecord, cfg: dict[str, Any], settings: Settings) -> Path:
    """Write the job's W&B run (offline) afresh and swap it in; returns its folder."""
    import wandb

    final_dir = wandb_dir(settings, job.id)
    staging = final_dir.with_name(f".{job.id}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True, mode=0o700)
    try:
        tags = [*(cfg.get("tags") or []), f"sdpo/{job.model}"[:64], job.id]
        config = {**job.params, "job_id": job.id,
                  "steps": {str(s.index): {"hyperparameters": s.hyperparameters, **s.lineage} for s in job.steps}}
        run = wandb.init(mode="offline", dir=str(staging), id=job.id, project=cfg["project"], entity=cfg.get("entity"),
                         name=cfg.get("name") or job.id, tags=tags, config=config, reinit="create_new",
                         settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                 x_disable_meta=True, save_code=False, symlink=False,
                                                 x_save_requirements=False))
        try:
            offset = 0
            for step in job.steps:
                last = offset
                for data in step.optimizer_steps:
                    last = offset + data["global_step"]
                    run.log({**{f"train/{k}": v for k, v in _numbers(data, _NOT_METRICS).items()},
                             "sdpo_step": step.index, "global_step": data["global_step"]}, step=last)
                run.log({**_step_results(step), "sdpo_step": step.index}, step=max(last, offset + 1))
                offset = max(last, offset + 1)
            if job.final:
                run.summary.update(job.final)
            run.summary.update({"status": job.status, "steps_tracked": len(job.steps)})
        finally:
            run.finish()
        # W&B's convenience links (latest-run, debug logs, one into ~/.cache) would dangle once moved.
        for path in list(staging.rglob("*")):
            if path.is_symlink():
                path.unlink()
        if final_dir.exists():
            old = final_dir.with_name(f".{job.id}.old.{uuid.uuid4().hex[:8]}")
            final_dir.rename(old)
            staging.rename(final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_dir


# ----------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def _mlflow_environment(trusted: bool) -> Iterator[None]:
    """Bounded waits, and the worker's MLflow credentials hidden from a URI a user chose (MLflow
    reads them from the environment on every request)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    hidden = {} if trusted else {k: os.environ.pop(k) for k in _MLFLOW_CREDENTIALS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


def check_tracking_address(uri: str, settings: Settings) -> None:
    """A user-chosen tracking URI again, now with DNS: every address of its host must be public or
    allowed (core.netguard); raises BlockedAddress, or ValueError for a URI that is not http(s)."""
    import httpx

    from core.netguard import Allowance, resolve_checked

    url = httpx.URL(uri)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("a job's tracking_uri must be an http(s) URL")
    resolve_checked(url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80),
                    Allowance.parse(settings.webhook_allowed_private_networks))


def write_mlflow(job: JobRecord, cfg: dict[str, Any], settings: Settings) -> str:
    """Bring the job's MLflow runs up to date; returns the parent run's id."""
    uri = cfg.get("tracking_uri") or settings.mlflow_tracking_uri
    if not uri:
        raise ValueError("no tracking_uri and no SDPO_MLFLOW_TRACKING_URI")
    trusted = uri == settings.mlflow_tracking_uri
    if not trusted:
        check_tracking_address(uri, settings)
    with _mlflow_environment(trusted):
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = cfg.get("experiment_name") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # created by another worker meanwhile
                created = client.get_experiment_by_name(name)
                if created is None:  # not a race after all: the create's own error stands
                    raise
                experiment_id = created.experiment_id
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job.id}'", max_results=1000)
        parent = next((r for r in runs if r.data.tags.get(KIND_TAG) == "job"), None)
        done = {r.data.tags.get(STEP_TAG) for r in runs if r.data.tags.get(KIND_TAG) == "step"}
        if parent is None:
            parent = client.create_run(experiment_id, run_name=cfg.get("run_name") or job.id,
                                       tags={JOB_TAG: job.id, KIND_TAG: "job", "sdpo.model": job.model})
            _log_params(client, parent.info.run_id, job.params)
        parent_id = parent.info.run_id
        for step in job.steps:
            if str(step.index) in done:
                continue
            child = client.create_run(experiment_id, run_name=f"step-{step.index}", tags={
                "mlflow.parentRunId": parent_id, JOB_TAG: job.id, KIND_TAG: "step", STEP_TAG: str(step.index),
                **{f"sdpo.{k}": v for k, v in step.lineage.items() if v is not None}})
            run_id = child.info.run_id
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, data["global_step"]) for data in step.optimizer_steps
                       for k, v in _numbers(data, _NOT_METRICS).items()]
            last = step.optimizer_steps[-1]["global_step"] if step.optimizer_steps else 0
            results = _step_results(step)
            metrics += [Metric(k, v, now, last) for k, v in results.items()]
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
                client.log_batch(run_id, metrics=metrics[start:start + 1000])
            _log_params(client, run_id, step.hyperparameters)
            client.log_batch(parent_id, metrics=[Metric(k, v, now, step.index) for k, v in results.items()])
            client.set_terminated(run_id, "FINISHED")
        if job.final:
            client.log_batch(parent_id, tags=[RunTag(f"sdpo.{k}", str(v)) for k, v in job.final.items() if v])
        if job.status in _ENDED:
            client.set_tag(parent_id, "sdpo.status", job.status)
            if parent.info.status != _ENDED[job.status]:  # once: a second end call keeps the end time
                client.set_terminated(parent_id, _ENDED[job.status])
        return parent_id


def _log_params(client: Any, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in values.items() if v is not None]  # MLflow's longest value
    for start in range(0, len(params), 100):  # and at most 100 params a batch
        client.log_batch(run_id, params=params[start:start + 100])
