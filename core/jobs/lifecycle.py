"""Every state change of a job and its steps, as a function of (session, …), for the API and the
worker alike: each does its `transition()`s (core.states holds the allowed edges) and its events,
with their wording, in one place.

Each function adds and flushes; the caller commits. Functions that change a job's status lock its
row and its steps' rows first (SELECT … FOR UPDATE on Postgres; SQLite serialises writers with
BEGIN IMMEDIATE), so a user's cancel and a worker's "step succeeded" cannot interleave and
overwrite each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from celery import Celery
from sqlalchemy.orm import Session

from core import ids
from core.celery_config import JOB_ENDED
from core.clock import utcnow
from core.errors import Conflict
from core.jobs import gates
from core.jobs.repository import (
    add_event,
    claim_step_row,
    existing_event_ids,
    file_uri,
    get_job,
    get_steps,
    latest_metrics_global_step,
    starting_model,
    step_training_uri,
)
from core.models import Checkpoint, Job, JobStep, RegisteredModel
from core.queue import enqueue_after_commit, job_chain
from core.states import JOB_TERMINAL, STEP_TERMINAL, JobStatus, StepStatus, transition


def remaining_step_indexes(steps: Iterable[JobStep]) -> list[int]:
    """Indexes of the steps still to run, in order (everything not yet succeeded)."""
    return [s.index for s in sorted(steps, key=lambda s: s.index) if s.status != StepStatus.SUCCEEDED]


def fine_tuned_model_name(job: Job) -> str:
    """OpenAI's naming, `ft:{base}:{owner}:{suffix}:{job id}` (suffix may be empty)."""
    return f"ft:{job.model_id}:{job.owner}:{job.suffix or ''}:{job.id}"


def create_job(session: Session, app: Celery, job: Job, steps: list[JobStep], *, origin: str,
               method_type: str) -> Job:
    """Add a new job (status validating_files, built by the API from a checked spec) and its steps
    (pending); the job is queued in the same transaction (its files were validated at upload) and
    the chain prepare_job | run_step(1..T) | finalize_job is sent after the commit. The event says
    "Created fine-tuning job <id>: <method_type> with T step(s) from <origin>."."""
    session.add(job)
    session.add_all(steps)
    transition(job, JobStatus.QUEUED)
    session.flush()
    enqueue_after_commit(session, job_chain(app, job.id, [step.index for step in steps]))
    add_event(session, job.id, f"Created fine-tuning job {job.id}: {method_type} with {job.n_steps} step(s) "
                               f"from {origin}.", data={"n_steps": job.n_steps, "method": method_type})
    return job


def cancel_job(session: Session, job: Job, app: Celery) -> Job:
    """Cancel now: the job and every unfinished step become `cancelled` in this transaction.

    A running step is marked cancelled too; the worker sees that on its next heartbeat and stops
    the training process. Cancelling is immediate (like OpenAI's) rather than a request, so a
    job is never left waiting on a worker that may be gone. Task `sdpo.job_ended` follows after
    the commit: when no step is running (queued, paused, between steps) no worker would otherwise
    discard its stored trainer state or close its tracked runs (MLflow: KILLED). Every cancelled job gets it: a paused job may have trainer state in the store
    whether or not it has integrations.
    """
    if job.status not in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING,
                          JobStatus.PAUSING, JobStatus.PAUSED):
        raise Conflict(f"Job {job.id} is {job.status} and cannot be cancelled.", param="fine_tuning_job_id",
                       code="job_not_cancellable")
    transition(job, JobStatus.CANCELLED)
    for step in get_steps(session, job.id, for_update=True):
        if step.status not in STEP_TERMINAL:
            transition(step, StepStatus.CANCELLED)
    add_event(session, job.id, "Job cancelled.")
    session.flush()
    enqueue_after_commit(session, app.signature(JOB_ENDED, args=(job.id,), immutable=True))
    return job


def pause_job(session: Session, job: Job) -> Job:
    """Pause: a queued job is paused at once; a running job moves to `pausing` and the worker
    saves the trainer state, stops, and sets `paused`."""
    if job.status == JobStatus.QUEUED:
        transition(job, JobStatus.PAUSED)
        for step in get_steps(session, job.id, for_update=True):
            if step.status == StepStatus.QUEUED:
                transition(step, StepStatus.PENDING)
        add_event(session, job.id, "Job paused.")
    elif job.status == JobStatus.RUNNING:
        transition(job, JobStatus.PAUSING)
        add_event(session, job.id, "Pause requested; the running step will save its state and stop.")
    else:
        raise Conflict(f"Job {job.id} is {job.status} and cannot be paused.", param="fine_tuning_job_id",
                       code="job_not_pausable")
    session.flush()
    return job


def resume_job(session: Session, job: Job, app: Celery) -> Job:
    """Resume a paused job: back to `queued`, and a chain of the remaining steps is sent after the
    commit (its prepare_job is a no-op for a job whose chunks already exist)."""
    if job.status != JobStatus.PAUSED:
        raise Conflict(f"Job {job.id} is {job.status}; only a paused job can be resumed.",
                       param="fine_tuning_job_id", code="job_not_resumable")
    transition(job, JobStatus.QUEUED)
    remaining = remaining_step_indexes(get_steps(session, job.id, for_update=True))
    add_event(session, job.id, f"Job resumed; {len(remaining)} step(s) to run.")
    session.flush()
    enqueue_after_commit(session, job_chain(app, job.id, remaining))
    return job


# ------------------------------------------------------------------------------------------------
# The worker's state changes. Each runs in the caller's transaction (worker.db.retrying around a
# session) and must be safe to run twice: a COMMIT whose answer was lost may have been applied, so
# each checks the state it expects before changing it.


def text_options(job: Job) -> tuple[str, str | None]:
    """(text_format, chat_template) of a job: ``method.<type>.text_format`` ("chat" unless "raw") and
    ``method.<type>.chat_template`` (None: the model's own)."""
    method = job.method or {}
    options = method.get(method.get("type") or "") or {}
    return options.get("text_format") or "chat", options.get("chat_template")


def chunks_from(session: Session, job_id: str, index: int) -> list[tuple[int, str, int]]:
    """[(step index, chunk URI, rows)] of a partitioned job's steps from `index` on, in order: the pairs
    not yet trained before step `index` (what rescoring reorders)."""
    steps = sorted((s for s in get_steps(session, job_id) if s.index >= index), key=lambda s: s.index)
    return [(s.index, s.chunk_uri or "", int((s.chunk_stats or {}).get("rows") or 0)) for s in steps]


def replace_chunks(session: Session, job_id: str, index: int, attempt: int,
                   written: list[tuple[int, str, dict[str, Any]]], record: dict[str, Any]) -> bool:
    """Rescoring before step `index` (attempt `attempt`, still running): steps index.. train on the
    reordered chunks `written` [(step index, URI, stats)]; the model that ordered them goes into the
    job's partition plan as ``pair_scores[index]`` and an event. False (nothing changed) when the
    attempt is no longer the running one."""
    job = session.get(Job, job_id, with_for_update=True)
    steps = get_steps(session, job_id)
    step = next((s for s in steps if s.index == index), None)
    if job is None or step is None or step.status != StepStatus.RUNNING or step.attempt != attempt:
        return False
    by_index = {k: (uri, stats) for k, uri, stats in written}
    for s in steps:
        if s.index in by_index:
            s.chunk_uri, s.chunk_stats = by_index[s.index]
    plan = dict(job.partition or {})
    plan["pair_scores"] = {**(plan.get("pair_scores") or {}), str(index): record}
    job.partition = plan
    add_event(session, job_id, f"Step {index}: the {sum(st['rows'] for _, _, st in written)} pairs not yet trained "
              f"were reordered easiest first by the previous step's model (sha256 {str(record.get('sha256'))[:12]}).",
              step_index=index, data={"pair_scores": record})
    return True


def samples_option(job: Job) -> dict[str, Any] | None:
    """``method.<type>.samples`` of a job (per-step samples, sdpo_engine/samples.py), or None."""
    method = job.method or {}
    samples = (method.get(method.get("type") or "") or {}).get("samples")
    return dict(samples) if isinstance(samples, dict) else None


def format_metric(x: Any) -> str:
    """A number as event messages show it (4 decimals), "-" when there is none."""
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


@dataclass(frozen=True)
class JobInputs:
    """What preparing a job reads: its files and starting model as storage URIs, its partition plan."""

    needs_chunks: bool  # a partitioned job whose chunks are not written yet
    plan: dict[str, Any]  # jobs.partition: strategy, n_steps, sizes, source_field, …
    train_uri: str
    files: list[tuple[str, str]]  # (file id, storage URI): training, per-step and validation files
    training: list[tuple[str, str]]  # the training and per-step files among them
    validation: tuple[str, str] | None  # the validation file, if any
    base_model: tuple[str, str, str]  # (source, id, uri): repository.starting_model
    text: tuple[str, str | None]  # text_options
    started: bool  # already running: a chain re-sent by the reaper, the file checks were done
    max_length: int
    seed: int


def job_inputs(session: Session, job_id: str) -> JobInputs | None:
    """What prepare_job needs, or None when the job is gone or no longer queued/running (cancelled,
    paused or finished before it started). Locks the job row."""
    job = get_job(session, job_id, for_update=True)
    if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return None
    steps = get_steps(session, job_id)
    training = list(dict.fromkeys([job.training_file_id] + [st.training_file_id for st in steps if st.training_file_id]))
    files = training + ([job.validation_file_id] if job.validation_file_id else [])
    return JobInputs(
        needs_chunks=bool(job.partition) and any(st.chunk_uri is None for st in steps),
        plan=dict(job.partition or {}), train_uri=file_uri(session, job.training_file_id),
        files=[(f, file_uri(session, f)) for f in dict.fromkeys(files)],
        training=[(f, file_uri(session, f)) for f in training],
        validation=(job.validation_file_id, file_uri(session, job.validation_file_id)) if job.validation_file_id else None,
        base_model=starting_model(session, job), text=text_options(job), started=job.status == JobStatus.RUNNING,
        max_length=job.hyperparameters.get("max_length", 512), seed=job.seed)


def start_job(session: Session, job_id: str, chunks: list[tuple[str, dict]], plan: dict[str, Any],
              warnings: Sequence[tuple[str, dict[str, Any]]] = ()) -> bool:
    """The job's chunks are written (or it has none): record them, queue its first unfinished step and
    move it to running ("Job started: …"), with `warnings` ([(message, data)]) as warn events in the
    same transaction. A warning is written once per job and `data["code"]`: a resumed job starts again
    and is warned of nothing twice. False when the job is gone or no longer queued/running:
    the caller deletes the `chunks` ([(uri, stats)]) it wrote, and the chain stops."""
    job = get_job(session, job_id, for_update=True)
    if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return False
    steps = get_steps(session, job_id, for_update=True)
    if chunks and all(st.chunk_uri is None for st in steps):
        for st, (uri, stats) in zip(steps, chunks, strict=True):
            st.chunk_uri, st.chunk_stats = uri, stats
        job.partition = plan
    first = next((st for st in steps if st.status not in STEP_TERMINAL), None)
    if first is not None and first.status == StepStatus.PENDING:
        transition(first, StepStatus.QUEUED)
    job.updated_at = utcnow()
    if job.status == JobStatus.QUEUED:
        # Only on the way to running: a chain re-sent by the reaper or the lost-message sweep
        # passes through here again and must not log a second start.
        transition(job, JobStatus.RUNNING)
        desc = f", partition {plan['strategy']}" if plan.get("strategy") else ""
        order = f" (order: {' -> '.join(plan['source_order'])})" if plan.get("source_order") else ""
        add_event(session, job_id, f"Job started: {job.n_steps} step(s){desc}{order}.",
                  data={"partition": plan} if plan else None)
        for message, data in warnings:
            event_id = ids.derived_id(ids.EVENT, job_id, "start-warning", str(data.get("code")))
            if not existing_event_ids(session, [event_id]):
                add_event(session, job_id, message, level="warn", data=data, event_id=event_id)
    return True


@dataclass(frozen=True)
class StepClaim:
    """A claimed attempt of a step and what it trains on (storage URIs), read in the claim's transaction."""

    step_id: str
    attempt: int
    n_steps: int
    reference_id: str | None  # the previous step's output checkpoint (the job's initial one for step 1)
    job_model: str
    owner: str
    base_model: tuple[str, str, str]  # (source, id, uri): repository.starting_model
    policy_init_uri: str | None  # the reference checkpoint's URI; None: the base model
    train_uri: str
    eval_uri: str | None
    hyperparameters: dict[str, Any]
    source_field: str
    recorded_global_step: int  # metrics of earlier attempts of this step go up to here
    text_format: str = "chat"
    chat_template: str | None = None
    samples: dict[str, Any] | None = None  # method.<type>.samples: {"n_prompts", "max_new_tokens"}
    rescore: bool = False  # partition pair_easy_to_hard with rescore: the chunks of steps >= index get reordered


def claim_step(session: Session, job_id: str, index: int, worker: str) -> StepClaim | bool:
    """Claim step `index` for `worker`: it becomes running with attempt + 1 ("Step i/n started …").

    Returns the claim, or True when the step already succeeded (a redelivered task: the chain goes
    on), or False when this delivery must not train (the job is not running; the previous step has
    not succeeded; another delivery claimed it). A job pausing between steps becomes paused here."""
    now = utcnow()
    job = get_job(session, job_id, for_update=True)
    if job is None:
        return False
    if job.status == JobStatus.PAUSING:  # the previous step finished as the pause came in
        transition(job, JobStatus.PAUSED)
        add_event(session, job_id, "Job paused between steps.")
        return False
    if job.status != JobStatus.RUNNING:
        return False
    steps = {st.index: st for st in get_steps(session, job_id)}
    step = steps[index]
    if step.status == StepStatus.SUCCEEDED:
        return True
    previous = steps.get(index - 1)
    if previous is not None and previous.status != StepStatus.SUCCEEDED:
        return False  # never train on a reference that does not exist yet
    reference_id = previous.output_checkpoint_id if previous else job.initial_checkpoint_id
    if not claim_step_row(session, step, worker=worker, reference_id=reference_id, now=now):
        return False
    job.current_step = index
    job.updated_at = now
    text_format, chat_template = text_options(job)
    claim = StepClaim(
        step_id=step.id, attempt=step.attempt, n_steps=job.n_steps, reference_id=reference_id,
        job_model=job.model, owner=job.owner, base_model=starting_model(session, job),
        policy_init_uri=session.get_one(Checkpoint, reference_id).uri if previous is not None else None,
        train_uri=step_training_uri(session, step),
        eval_uri=file_uri(session, job.validation_file_id) if job.validation_file_id else None,
        hyperparameters=dict(step.hyperparameters),
        source_field=(job.partition or {}).get("source_field") or "source",
        recorded_global_step=latest_metrics_global_step(session, job_id, index),
        text_format=text_format, chat_template=chat_template, samples=samples_option(job),
        rescore=bool((job.partition or {}).get("rescore")))
    add_event(session, job_id, f"Step {index}/{job.n_steps} started (attempt {claim.attempt}) on {worker}; "
              f"reference and initial policy: {reference_id or job.model}.", step_index=index,
              data={"reference_checkpoint": reference_id, "attempt": claim.attempt, "worker": worker})
    return claim


ENDED_BY_GATE: Literal["ended_by_gate"] = "ended_by_gate"


def step_succeeded(session: Session, job_id: str, index: int, attempt: int, *, checkpoint_id: str, uri: str,
                   sha256: str, size: int, metrics: dict[str, Any],
                   event_id: str) -> bool | Literal["ended_by_gate"] | None:
    """Attempt `attempt` of step `index` wrote its checkpoint (files already in the store at `uri`,
    `size` bytes, `sha256` from its manifest): the checkpoint row is added, the step succeeds with
    `metrics`, the next step is queued ("Step i succeeded: …"). True also when an earlier try
    committed this; None when the step was cancelled or handed to another attempt meanwhile (the
    caller deletes the stored files; the chain stops).

    A job with a gate (core.jobs.gates) has it checked here, in the same transaction: when it fails
    the job ends `succeeded` with the gate's result (`end_by_gate`) and ENDED_BY_GATE is returned
    (also for a retry of a commit that did so): the chain stops, the caller finishes the job as
    after finalize_job."""
    job = get_job(session, job_id, for_update=True)
    if job is None:
        return None
    steps = {st.index: st for st in get_steps(session, job_id, for_update=True)}
    step = steps[index]
    if step.output_checkpoint_id == checkpoint_id:
        # An earlier try committed, its answer was lost.
        return ENDED_BY_GATE if (job.gate or {}).get("status") == "failed" else True
    if step.status != StepStatus.RUNNING or step.attempt != attempt:
        return None
    session.add(Checkpoint(id=checkpoint_id, owner=job.owner, job_id=job_id, step_index=index, uri=uri,
                           sha256=sha256, bytes=size, metrics=metrics))
    session.flush()
    step.output_checkpoint_id = checkpoint_id
    step.metrics = metrics
    step.error = None
    transition(step, StepStatus.SUCCEEDED)
    following = steps.get(index + 1)
    if following is not None and following.status == StepStatus.PENDING and job.status == JobStatus.RUNNING:
        transition(following, StepStatus.QUEUED)
    job.updated_at = utcnow()
    add_event(session, job_id, f"Step {index} succeeded: checkpoint {checkpoint_id}, first loss "
              f"{format_metric(metrics['first_loss'])}, last loss {format_metric(metrics['last_loss'])}, mean "
              f"gamma_ref {format_metric(metrics['mean_gamma_ref'])}.", step_index=index,
              data={"checkpoint": checkpoint_id, **metrics}, event_id=event_id)
    gate = gates.gate_of(job.method)
    if gate is not None and job.status in (JobStatus.RUNNING, JobStatus.PAUSING):
        history = [(st.index, st.output_checkpoint_id or "", st.metrics) for _, st in sorted(steps.items())
                   if st.status == StepStatus.SUCCEEDED and st.index <= index]
        outcome = gates.check_gate(gate, history)
        if outcome is not None:
            end_by_gate(session, job, list(steps.values()), outcome)
            return ENDED_BY_GATE
    return True


def end_by_gate(session: Session, job: Job, steps: list[JobStep], outcome: dict[str, Any]) -> str:
    """The gate failed after step `outcome["failed_step"]` (gates.check_gate): the later steps are
    cancelled, the checkpoint of `outcome["result_step"]` is registered as the job's
    fine_tuned_model, the outcome is stored in `job.gate` and the job succeeds (a warn event "Gate
    failed after step k: …", then "Job succeeded: …"; the job.succeeded webhook carries the gate).
    `job` and `steps` are locked by the caller. Returns the model's name."""
    for st in steps:
        if st.status not in STEP_TERMINAL:
            transition(st, StepStatus.CANCELLED)
    final = session.get_one(Checkpoint, outcome["result_checkpoint"])
    name = _register_result(session, job, final, steps)
    job.current_step = outcome["failed_step"]
    job.gate = {**outcome, "fine_tuned_model": name}
    transition(job, JobStatus.SUCCEEDED)
    add_event(session, job.id, gates.describe(outcome), level="warn", step_index=outcome["failed_step"],
              data={"gate": job.gate})
    add_event(session, job.id, f"Job succeeded: {name} (checkpoint {final.id}, step {outcome['result_step']}); "
              f"ended by its gate after step {outcome['failed_step']}.",
              data={"fine_tuned_model": name, "checkpoint": final.id, "gate": job.gate})
    return name


def _register_result(session: Session, job: Job, final: Checkpoint, steps: list[JobStep]) -> str:
    """Register `final` as the model `fine_tuned_model_name(job)` (once) and set the job's
    fine_tuned_model and trained_tokens (the tokens of the steps that ran). Returns the name."""
    base = session.get_one(RegisteredModel, job.model_id)
    name = fine_tuned_model_name(job)
    if session.get(RegisteredModel, name) is None:
        session.add(RegisteredModel(id=name, owner=job.owner, source="checkpoint", uri=final.uri,
                                    default_hyperparameters=dict(base.default_hyperparameters or {}),
                                    job_id=job.id, checkpoint_id=final.id))
    job.fine_tuned_model = name
    job.trained_tokens = sum(int((st.metrics or {}).get("num_tokens") or 0) for st in steps) or None
    return name


def step_paused(session: Session, app: Celery, job_id: str, step_id: str, attempt: int,
                stopped: dict[str, Any] | None, *, event_id: str) -> None:
    """The training process saved its trainer state and exited (`stopped`: {"global_step": …}): the
    step goes back to queued. A pausing job becomes paused ("Step i paused at …"); a running one (a
    SIGTERM from outside) gets a chain from this step sent after the commit. Nothing when the step no
    longer runs this attempt (recorded by an earlier try, cancelled, or another attempt's)."""
    job = get_job(session, job_id, for_update=True)
    step = session.get(JobStep, step_id, with_for_update=True)
    if job is None or step is None or step.status != StepStatus.RUNNING or step.attempt != attempt:
        return
    at = (stopped or {}).get("global_step")
    transition(step, StepStatus.QUEUED)
    if job.status == JobStatus.PAUSING:
        transition(job, JobStatus.PAUSED)
        add_event(session, job_id, f"Step {step.index} paused at global step {at}; it resumes from its trainer "
                  "checkpoint.", step_index=step.index, data=stopped, event_id=event_id)
    elif job.status == JobStatus.RUNNING:
        # Stopped without a pause (a SIGTERM from outside): run it again from its checkpoint.
        add_event(session, job_id, f"Step {step.index} stopped at global step {at} without a pause request; "
                  "requeued to resume from its trainer checkpoint.", level="warn", step_index=step.index,
                  data=stopped, event_id=event_id)
        job.updated_at = utcnow()
        enqueue_after_commit(session, job_chain(app, job_id, remaining_step_indexes(get_steps(session, job_id))))


def requeue_or_fail_step(session: Session, app: Celery, job: Job, steps: list[JobStep], step: JobStep,
                         reason: str, *, max_attempts: int) -> bool:
    """After a failed or lost attempt (`reason`, for the event): count it in `step.failed_attempts` and
    requeue the step (a chain from it is sent after the commit; a pausing job becomes paused instead),
    or, at `max_attempts` failed attempts, fail it, cancel the later steps and fail the job with
    `retries_exhausted`. `job` and `steps` are locked by the caller. True if requeued."""
    step.failed_attempts = failures = step.failed_attempts + 1
    if failures >= max_attempts:
        message = (f"Step {step.index} failed after {failures} attempt{'s' if failures != 1 else ''} "
                   f"(max_step_attempts={max_attempts}); the last one: {reason}.")
        step.error = {"code": "retries_exhausted", "message": message}
        transition(step, StepStatus.FAILED)
        for later in steps:
            if later.status not in STEP_TERMINAL:
                transition(later, StepStatus.CANCELLED)
        if job.status not in JOB_TERMINAL:
            job.error = {"code": "retries_exhausted", "message": message, "param": None}
            transition(job, JobStatus.FAILED)
        add_event(session, job.id, message, level="error", step_index=step.index, data={"code": "retries_exhausted"})
        return False
    transition(step, StepStatus.QUEUED)
    job.updated_at = utcnow()
    data = {"failed_attempt": step.attempt, "reason": reason}
    if job.status == JobStatus.PAUSING:
        transition(job, JobStatus.PAUSED)
        add_event(session, job.id, f"Step {step.index}: attempt {step.attempt} ended ({reason}); the job is paused "
                  "and resumes from the step's last trainer checkpoint.", level="warn", step_index=step.index,
                  data=data)
        return True
    add_event(session, job.id, f"Step {step.index}: attempt {step.attempt} ended ({reason}); requeued for attempt "
              f"{step.attempt + 1} of {max_attempts}, resuming from its last trainer checkpoint.",
              level="warn", step_index=step.index, data=data)
    enqueue_after_commit(session, job_chain(app, job.id, remaining_step_indexes(steps)))
    return True


def attempt_failed(session: Session, app: Celery, job_id: str, index: int, attempt: int, reason: str,
                   *, max_attempts: int) -> None:
    """Attempt `attempt` of step `index` failed in a way a retry may fix (`requeue_or_fail_step`);
    nothing when the step no longer runs this attempt."""
    job = get_job(session, job_id, for_update=True)
    steps = get_steps(session, job_id, for_update=True)
    step = next(st for st in steps if st.index == index)
    if job is None or step.status != StepStatus.RUNNING or step.attempt != attempt:
        return
    requeue_or_fail_step(session, app, job, steps, step, reason, max_attempts=max_attempts)


def requeue_stale_step(session: Session, app: Celery, job_id: str, cutoff: datetime, *, max_attempts: int) -> int:
    """The first running step of the job whose heartbeat is older than `cutoff` lost its worker:
    requeue or fail it (`requeue_or_fail_step`). Returns 1 if one was requeued, else 0."""
    job = get_job(session, job_id, for_update=True)
    if job is None:
        return 0
    steps = get_steps(session, job_id, for_update=True)
    for st in steps:
        if st.status != StepStatus.RUNNING or st.heartbeat_at is None or st.heartbeat_at >= cutoff:
            continue
        silent = int((utcnow() - st.heartbeat_at).total_seconds())
        reason = f"its worker {st.worker} stopped answering for {silent} s"
        return int(requeue_or_fail_step(session, app, job, steps, st, reason, max_attempts=max_attempts))
    return 0


def resend_lost_chain(session: Session, app: Celery, job_id: str, cutoff: datetime) -> int:
    """The broker lost the job's message: send a chain of its remaining steps again after the commit
    (a warn event says so), if it still waits (queued or running, no running step, unchanged since
    `cutoff`). Returns 1 if sent, else 0."""
    job = get_job(session, job_id, for_update=True)
    if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or job.updated_at >= cutoff:
        return 0
    steps = get_steps(session, job_id, for_update=True)
    if any(st.status == StepStatus.RUNNING for st in steps):
        return 0
    remaining = remaining_step_indexes(steps)
    job.updated_at = utcnow()
    add_event(session, job_id, "The broker had lost this job's message; sent again from step "
              f"{remaining[0] if remaining else job.n_steps}.", level="warn", data={"remaining_steps": remaining})
    enqueue_after_commit(session, job_chain(app, job_id, remaining))
    return 1


def fail_job(session: Session, job_id: str, index: int | None, code: str, message: str) -> None:
    """The job fails with a readable error (`code`, `message`, also its error event); step `index`, if
    running, fails with it and the other unfinished steps are cancelled. Nothing for a finished job."""
    job = get_job(session, job_id, for_update=True)
    if job is None or job.status in JOB_TERMINAL:
        return
    for st in get_steps(session, job_id, for_update=True):
        if st.status in STEP_TERMINAL:
            continue
        if st.index == index and st.status == StepStatus.RUNNING:
            st.error = {"code": code, "message": message}
            transition(st, StepStatus.FAILED)
        else:
            transition(st, StepStatus.CANCELLED)
    job.error = {"code": code, "message": message, "param": None}
    transition(job, JobStatus.FAILED)
    add_event(session, job_id, message, level="error", step_index=index, data={"code": code})


def step_stopped_by_cancel(session: Session, job_id: str, index: int) -> None:
    """The running step of a cancelled job stopped its training process (the cancel itself, from the
    user, changed the statuses already)."""
    add_event(session, job_id, f"Step {index} stopped: the job was cancelled.", step_index=index)


def finalize_job(session: Session, job_id: str) -> str | None:
    """Every step succeeded: register the last step's checkpoint as the model `fine_tuned_model_name`
    (later jobs can start from it) and the job succeeds ("Job succeeded: …"). Returns that name, or
    None when the job is not ready (a step not succeeded, the job not running) or already succeeded."""
    job = get_job(session, job_id, for_update=True)
    if job is None or job.status == JobStatus.SUCCEEDED:
        return None
    steps = get_steps(session, job_id, for_update=True)
    if job.status not in (JobStatus.RUNNING, JobStatus.PAUSING) or any(
            st.status != StepStatus.SUCCEEDED for st in steps):
        return None
    final = session.get_one(Checkpoint, steps[-1].output_checkpoint_id)
    name = _register_result(session, job, final, steps)
    job.current_step = job.n_steps
    gate = gates.gate_of(job.method)
    if gate is not None:  # every step passed it
        job.gate = {"status": "passed", "metric": gate["metric"], "min_delta": gate.get("min_delta", 0.0),
                    "max_drift": gate.get("max_drift"), "on_fail": gate.get("on_fail", "stop"),
                    "steps_checked": job.n_steps}
    transition(job, JobStatus.SUCCEEDED)
    add_event(session, job_id, f"Job succeeded: {name} (checkpoint {final.id}).",
              data={"fine_tuned_model": name, "checkpoint": final.id})
    return name
