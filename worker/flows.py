"""The orchestration of a job, one function per task: prepare, run one step, finalise, reap.

Orchestration only: each transaction is `db.retrying` around a session and one call of
`core.jobs.lifecycle` (every state change, its events and their wording) or `core.jobs.repository`
(every query); file-system work is in `worker.workdir`, the text checks in `worker.checks`, the
engine's events into the log in `worker.relay`. The Celery task passes in the worker's `settings`
and `app` (`worker.tasks`).

Every function takes ids, opens its own short transactions, and never holds a transaction open
while training runs (hours). Each returns `Outcome.CONTINUE` when the chain should go on to the
next task, or `Outcome.STOP` when it must not (the job failed, was cancelled or paused, or this
delivery was a duplicate): the Celery task turns STOP into `Ignore`, which ends the chain.

sDPO lives in `run_step`: the step's policy starts from the previous step's output checkpoint,
and the same checkpoint is its frozen reference (the base model for step 1).

What survives what (tests/reliability proves each):

- a duplicate or redelivered message: the claim (a conditional UPDATE) lets one delivery train;
- a worker killed mid-step: its heartbeat goes stale, `reap` requeues the step (a new chain) and
  the next attempt resumes from the newest complete trainer checkpoint (saved every
  `step_save_steps` optimizer steps, and on SIGTERM: the training child of a killed worker gets
  one). At most the optimizer steps since that save are trained again; their metrics events are
  written once (the first attempt's), and a "resumes from" event names the redone range;
- a training process that crashes: the step is retried up to `max_step_attempts` (bad input is
  not: it fails at once), then the job fails with `retries_exhausted`;
- a NaN or infinite reference log-prob, loss or gradient norm (engine exit 3): the same inputs give
  the same numbers, so no retry; the job fails with `non_finite` and nothing is registered;
- the broker losing its messages: `reap` re-sends a chain for every job that waits on a message
  the broker does not hold;
- the database restarting: every transaction is retried (`worker.db.retrying`) and written to be
  safe to run twice; the supervisor keeps training and buffers events meanwhile;
- a checkpoint that cannot be stored: the job fails with `checkpoint_write_failed`, and nothing
  is registered or left under the checkpoint's name;
- a step stopped on one host and resumed on another without a shared folder (an S3 store): the
  trainer checkpoint it stopped with goes through the store (`worker.trainer_state`); a training
  file the store cannot serve after retries fails the step with `storage_unavailable`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery

from core import ids
from core.clock import utcnow
from core.jobs import lifecycle, repository
from core.settings import Settings, get_settings
from core.states import JOB_TERMINAL, JobStatus, StepStatus
from core.storage import CorruptObject, StorageUnavailable
from sdpo_engine.manifest import read_manifest, verify_checkpoint
from sdpo_engine.partition import PartitionError
from sdpo_engine.protocol import (
    CURRICULUM_STRATEGIES,
    PAIR_CURRICULUM_STRATEGIES,
    TRAINING_DATA_CODES,
    ExitCode,
)
from worker import broker, db, tracking, trainer_state, workdir
from worker.checks import check_text, held_out_warning
from worker.relay import Relay, backfill_metrics
from worker.supervisor import CANCEL, GO, PAUSE, engine_command, supervise
from worker.workdir import describe_os_error, local_path

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Outcome", "describe_os_error", "finalize_job", "prepare_job", "reap", "run_step"]

REAP_RETRY_SECONDS = 15.0
_PATH = re.compile(r"(/[^\s:'\"]+)+")  # server paths stay out of the errors users read


class Outcome(Enum):
    CONTINUE = "continue"
    STOP = "stop"


def _chain(goes_on: bool | None) -> Outcome:
    return Outcome.CONTINUE if goes_on else Outcome.STOP


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _in_session(work: Callable[..., T], *args: Any, what: str, seconds: float | None = None, **kwargs: Any) -> T:
    """One lifecycle call in its own transaction, retried while the database is away (worker.db)."""

    def unit() -> T:
        with db.session() as s:
            return work(s, *args, **kwargs)

    return db.retrying(unit, what=what, seconds=seconds)


# ----------------------------------------------------------------------------------------------
# prepare_job


def prepare_job(job_id: str, *, settings: Settings) -> Outcome:
    """Check the files against the model, build the chunks (partitioned jobs), move the job to
    running, queue the first step."""
    found = _in_session(lifecycle.job_inputs, job_id, what=f"prepare {job_id}")
    if found is None:
        return Outcome.STOP  # cancelled, paused or finished before it started
    plan, model_id = found.plan, found.base_model[1]
    base: Path | None = None
    warnings: list[tuple[str, dict]] = []  # warn events written with the job's start
    if not found.started:
        # Before any chunk or step: every file against the model's tokenizer (markup in the text,
        # message lists without a chat template), so a job that cannot train as asked fails here.
        try:
            base = workdir.model_dir(settings, found.base_model)
        except CorruptObject as e:  # a checkpoint in an S3 store whose download failed its sha256 check
            return _fail_job(job_id, None, "corrupt_checkpoint", f"The model {model_id} is corrupt in the "
                             f"checkpoint store ({_PATH.sub('<path>', str(e))[:300]})")
        except StorageUnavailable as e:
            return _fail_job(job_id, None, "storage_unavailable", f"The model {model_id} could not be read from "
                             f"the checkpoint store after retries ({_PATH.sub('<path>', str(e))[:300]}).")
        except (OSError, RuntimeError) as e:
            return _fail_job(job_id, None, "invalid_model", f"The model {model_id} could not be "
                             f"prepared for training: {_PATH.sub('<path>', str(e))[:500]}")
        refused = check_text(found.files, base, model_id, *found.text,
                             source_field=plan.get("source_field") or "source")
        if refused is not None:
            return _fail_job(job_id, None, *refused)
        if found.validation is not None:
            warning = held_out_warning(found.training, found.validation,
                                       source_field=plan.get("source_field") or "source")
            if warning is not None:
                warnings.append(warning)
    written: list[tuple[str, dict]] = []
    if found.needs_chunks:
        # the sources (or, pair_easy_to_hard, the pairs) are scored with the model
        scored = plan.get("strategy") in CURRICULUM_STRATEGIES + PAIR_CURRICULUM_STRATEGIES
        if scored and base is None:
            base = workdir.model_dir(settings, found.base_model)
        try:
            written, plan = workdir.write_chunks(settings, job_id, local_path(found.train_uri), plan,
                                                 base if scored else None, found.max_length, found.seed,
                                                 text=found.text)
        except (PartitionError, ValueError) as e:
            return _fail_job(job_id, None, "partition_failed", str(e))
    if _in_session(lifecycle.start_job, job_id, written, plan, warnings, what=f"start {job_id}"):
        return Outcome.CONTINUE
    for uri, _ in written:
        db.storage().delete(uri)
    return Outcome.STOP


# ----------------------------------------------------------------------------------------------
# run_step


def run_step(job_id: str, index: int, *, settings: Settings, app: Celery) -> Outcome:
    """Claim step `index`, train it in a child process, record its checkpoint."""
    me = worker_name()
    claim = _in_session(lifecycle.claim_step, job_id, index, me, what=f"claim step {index} of {job_id}")
    if isinstance(claim, bool):
        return _chain(claim)
    try:
        return _train_claimed_step(job_id, index, claim, settings, app)
    except Exception as exc:
        # Whatever broke here (a model that would not convert, a full disk, the database away for
        # longer than db_retry_seconds) must not leave the step `running` until the reaper notices.
        log.exception("step %s of %s, attempt %s: the worker failed", index, job_id, claim.attempt)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        return _retry_or_fail(job_id, index, claim.attempt,
                              f"the worker failed: {type(exc).__name__}: {_PATH.sub('<path>', first_line)}",
                              settings=settings, app=app)


def _train_claimed_step(job_id: str, index: int, claim: lifecycle.StepClaim, settings: Settings,
                        app: Celery) -> Outcome:
    attempt = claim.attempt
    # The initial checkpoint from the store: the previous step's, or (step 1 of a job from a
    # fine-tuned model in an S3 store) the job's model itself.
    from_store = claim.policy_init_uri or (claim.base_model[2] if claim.base_model[2].startswith("s3://") else None)
    policy_init: Path | None = None
    if from_store:
        name = claim.reference_id or claim.job_model
        try:
            policy_init, cache_hit = workdir.checkpoint_dir(from_store)
        except (CorruptObject, FileNotFoundError) as exc:
            return _fail_job(job_id, index, "corrupt_checkpoint",
                             f"Step {index} failed: its initial checkpoint {name} is corrupt or missing in the "
                             f"store ({_PATH.sub('<path>', str(exc))[:300]})")
        except StorageUnavailable as exc:
            return _fail_job(job_id, index, "storage_unavailable",
                             f"Step {index} failed: its initial checkpoint {name} could not be read from the "
                             f"store after retries ({_PATH.sub('<path>', str(exc))[:300]}); start a new job "
                             "(or branch from the last good checkpoint) once the store is back.")
        if cache_hit is not None:
            _record_cache(job_id, index, str(name), policy_init, cache_hit)
    base = workdir.model_dir(settings, claim.base_model)  # an S3 model: in the cache by now
    if policy_init is None:
        policy_init = base
    # A checkpoint handed over through storage is checked against its manifest before it is
    # trained on: a truncated copy or a flipped byte must fail loudly, not train silently.
    if read_manifest(policy_init) is not None:
        problems = verify_checkpoint(policy_init)
        if problems:
            return _fail_job(job_id, index, "corrupt_checkpoint",
                             f"Step {index} failed: its initial checkpoint {claim.reference_id or claim.job_model} "
                             f"is corrupt ({'; '.join(problems[:3])})")
    work = workdir.step_work_dir(settings, job_id, index)
    attempt_dir = workdir.new_attempt_dir(work, attempt)
    out_dir = attempt_dir / "output"
    resume_from = trainer_state.resume_point(db.storage(), job_id, index, attempt, work,
                                             note=partial(_step_event, job_id, index))
    recorded = claim.recorded_global_step
    if resume_from is not None:
        recorded = db.retrying(lambda: backfill_metrics(job_id, index, resume_from, recorded),
                               what=f"backfill metrics of step {index} of {job_id}")
    train_uri = claim.train_uri
    try:
        if claim.rescore and index > 1:  # pair_easy_to_hard + rescore: the pairs left, ordered by M_{index-1}
            train_uri = _rescore(job_id, index, attempt, policy_init, claim, settings) or train_uri
        train_file = local_path(train_uri)  # an S3 store: downloaded into this host's cache
        eval_file = local_path(claim.eval_uri) if claim.eval_uri else None
    except StorageUnavailable as exc:
        return _fail_job(job_id, index, "storage_unavailable",
                         f"Step {index} failed: its training data could not be read from the store after "
                         f"retries ({_PATH.sub('<path>', str(exc))[:300]}); resume the job once the store is back.")
    # Held-out samples (sdpo_engine/samples.py): step 1 also answers with the base, before training.
    samples = ({**claim.samples, "seed": int(claim.hyperparameters.get("seed") or 0), "base": index == 1}
               if claim.samples and eval_file else None)
    spec_path = workdir.write_step_spec(attempt_dir, {
        "index": index, "samples": samples, "policy_init": str(policy_init), "train_file": str(train_file),
        "output_dir": str(out_dir), "work_dir": str(attempt_dir / "trainer"),
        "hyperparameters": claim.hyperparameters,
        "eval_file": str(eval_file) if eval_file else None,
        "eval_reference": str(base) if eval_file else None,
        "source_field": claim.source_field, "save_steps": settings.step_save_steps,
        "text_format": claim.text_format, "chat_template": claim.chat_template,
        **settings.training_settings(), "distributed": settings.step_distributed()})

    stopped_because: list[str] = []

    def heartbeat() -> None:
        with db.session() as s:
            repository.touch_heartbeat(s, claim.step_id, attempt)

    def control() -> str:
        with db.session() as s:
            job_status, step_status, step_attempt = repository.step_control_state(s, job_id, claim.step_id)
        if job_status in (JobStatus.CANCELLED, JobStatus.FAILED) or step_status == StepStatus.CANCELLED:
            stopped_because.append("cancelled")
            return CANCEL
        if step_status != StepStatus.RUNNING or step_attempt != attempt:
            stopped_because.append("superseded")
            return CANCEL  # the reaper gave this step to another attempt: this one must stop
        if job_status == JobStatus.PAUSING:
            return PAUSE
        return GO

    outcome = supervise(engine_command("step", str(spec_path)), log_path=attempt_dir / "engine.log",
                        relay=Relay(job_id, index, attempt, recorded), control=control, heartbeat=heartbeat,
                        heartbeat_seconds=settings.step_heartbeat_seconds,
                        poll_seconds=min(1.0, settings.step_heartbeat_seconds),
                        flush_seconds=settings.db_retry_seconds, warm=settings.warm_engine,
                        env=settings.engine_environment())
    log.info("step %s of %s: engine process exited %s (%s start)", index, job_id, outcome.returncode,
             "warm" if outcome.warm else "cold")

    if outcome.action == CANCEL:
        shutil.rmtree(out_dir, ignore_errors=True)
        if stopped_because[:1] == ["superseded"]:
            # Another attempt owns the step now and takes its trainer state from this folder.
            log.warning("step %s of %s: attempt %s superseded by a newer attempt; stopped", index, job_id, attempt)
            return Outcome.STOP
        shutil.rmtree(work.parent, ignore_errors=True)  # the job is over: its trainer state goes
        _in_session(lifecycle.step_stopped_by_cancel, job_id, index, what="record a cancel")
        _job_ended(job_id, settings)
        return Outcome.STOP
    if outcome.returncode == ExitCode.STOPPED:
        # The child saved its trainer state and exited (a pause, or a SIGTERM from elsewhere); into
        # the store before the pause is recorded, so a resume on any host finds it.
        _attempt_ended(job_id, index, attempt, work)
        _in_session(lifecycle.step_paused, app, job_id, claim.step_id, attempt, outcome.stopped,
                    event_id=ids.new_id(ids.EVENT), what=f"record the pause of step {index} of {job_id}")
        return Outcome.STOP
    if outcome.returncode != 0 or outcome.result is None:
        err = outcome.error or {}
        message = err.get("message") or _exit_description(outcome.returncode)
        if not err and outcome.tail:
            message += ": " + outcome.tail[-1][:500]
        if outcome.returncode == ExitCode.NON_FINITE or err.get("code") == "non_finite":
            # The same model, data and hyperparameters give the same NaN: no retry, nothing registered.
            shutil.rmtree(out_dir, ignore_errors=True)
            return _fail_job(job_id, index, "non_finite", f"Step {index} failed: {message}")
        if outcome.returncode == ExitCode.BAD_INPUT:  # bad spec or data: no retry can help
            code = str(err["code"]) if err.get("code") in TRAINING_DATA_CODES else "invalid_training_data"
            return _fail_job(job_id, index, code, f"Step {index} failed: {message}")
        _attempt_ended(job_id, index, attempt, work)  # its last save, for the next attempt on any host
        return _retry_or_fail(job_id, index, attempt, f"the training process failed ({message})",
                              settings=settings, app=app)
    return _succeeded(job_id, index, attempt, out_dir, outcome.result["summary"], outcome.last_metrics or {}, work,
                      settings)


def _record_cache(job_id: str, index: int, name: str, folder: Path, hit: bool) -> None:
    """The step's event saying whether its initial checkpoint came from this host's cache (counted
    by /metrics as sdpo_checkpoint_cache_total)."""
    event_id = ids.new_id(ids.EVENT)
    word = "hit" if hit else "miss"
    message = (f"Checkpoint cache {word}: step {index} starts from {name} "
               + ("already on this worker." if hit else "downloaded from the store and verified."))
    data = {"checkpoint_cache": word, "checkpoint": name, "bytes": workdir.tree_bytes(folder)}
    _in_session(repository.add_event, job_id, message, data=data, step_index=index, event_id=event_id,
                what=f"record the cache {word} of step {index} of {job_id}")


def _step_event(job_id: str, index: int, message: str, *, level: str = "info", data: dict[str, Any]) -> None:
    """One event of step `index` (written once however often the transaction is retried)."""
    _in_session(repository.add_event, job_id, message, level=level, data=data, step_index=index,
                event_id=ids.new_id(ids.EVENT), what=f"record an event of step {index} of {job_id}")


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was killed by {name}"
    return f"the training process exited with {returncode}"


def _rescore(job_id: str, index: int, attempt: int, model: Path, claim: lifecycle.StepClaim,
             settings: Settings) -> str | None:
    """Reorder the chunks of steps index.. by `model`'s gamma (workdir.rescore_chunks) and record them;
    returns step `index`'s new chunk URI (None: this attempt was superseded meanwhile)."""
    remaining = _in_session(lifecycle.chunks_from, job_id, index, what=f"chunks of {job_id} from step {index}")
    max_length = int(claim.hyperparameters.get("max_length") or 512)
    written, record = workdir.rescore_chunks(settings, job_id, index, model, remaining, source_field=claim.source_field,
                                             max_length=max_length, text=(claim.text_format, claim.chat_template))
    if not _in_session(lifecycle.replace_chunks, job_id, index, attempt, written, record,
                       what=f"rescored chunks of {job_id} from step {index}"):
        return None
    return written[0][1]


def _succeeded(job_id: str, index: int, attempt: int, out_dir: Path, summary: dict[str, Any],
               last_metrics: dict[str, Any], work: Path, settings: Settings) -> Outcome:
    """The engine exited 0 with its result (`summary`) and the checkpoint in `out_dir`: store it,
    then record the step as succeeded and go through the step's end transition (or the job's, when
    the job's gate ended it here)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return _fail_job(job_id, index, "step_failed", f"Step {index} wrote no checkpoint manifest")
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    size = workdir.tree_bytes(out_dir)
    # Into the store first, then the row: a checkpoint row always names complete files.
    try:
        uri = workdir.store_checkpoint(out_dir, job_id, checkpoint_id)
    except OSError as exc:
        log.error("step %s of %s: storing checkpoint %s failed", index, job_id, checkpoint_id, exc_info=True)
        return _fail_job(job_id, index, "checkpoint_write_failed",
                         f"Step {index} failed: its checkpoint could not be written to the checkpoint store "
                         f"({describe_os_error(exc)}). Nothing was registered; free space or fix the store, then "
                         "start a new job (or branch from the last good checkpoint).")
    metrics = {k: summary.get(k) for k in ("first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy",
                                           "reward_margin", "eval", "drift", "samples", "pairs", "pairs_used", "pairs_dropped",
                                           "train_seconds", "global_steps")}
    metrics["num_tokens"] = last_metrics.get("num_tokens")
    try:
        recorded = _in_session(lifecycle.step_succeeded, job_id, index, attempt, checkpoint_id=checkpoint_id,
                               uri=uri, sha256=manifest["checkpoint_sha256"], size=size, metrics=metrics,
                               event_id=ids.new_id(ids.EVENT), what=f"record step {index} of {job_id}")
    except BaseException:
        db.storage().delete(uri)
        raise
    if recorded is None:
        db.storage().delete(uri)  # cancelled or handed to another attempt meanwhile
        return Outcome.STOP
    if recorded == lifecycle.ENDED_BY_GATE:  # the job's gate ended it here: as after finalize_job
        shutil.rmtree(work.parent, ignore_errors=True)
        _job_ended(job_id, settings, last_step=index)
        return Outcome.STOP
    _step_ended(job_id, index, work, settings)
    return Outcome.CONTINUE


def _retry_or_fail(job_id: str, index: int, attempt: int, reason: str, *, settings: Settings,
                   app: Celery) -> Outcome:
    _in_session(lifecycle.attempt_failed, app, job_id, index, attempt, reason,
                max_attempts=settings.max_step_attempts, what=f"requeue step {index} of {job_id}")
    end_job(job_id, settings=settings)
    return Outcome.STOP


def _fail_job(job_id: str, index: int | None, code: str, message: str) -> Outcome:
    """The job fails with a readable error; its unfinished steps are cancelled (the failed one failed)."""
    _in_session(lifecycle.fail_job, job_id, index, code, message, what=f"fail {job_id}")
    _job_ended(job_id)
    return Outcome.STOP


# ----------------------------------------------------------------------------------------------
# The end transitions, one function each: what the end of an attempt, a step or a job does besides
# its lifecycle call, whoever ended it (this worker, the job's gate, a cancel, the reaper).


def _attempt_ended(job_id: str, index: int, attempt: int, work: Path) -> None:
    """Attempt `attempt` of step `index` ended and another attempt may resume the step (a pause or a
    SIGTERM: engine exit 75; a training process that failed in a way a retry may fix): the newest
    complete trainer checkpoint in this host's work folder `work` goes into the store, for the next
    attempt on any host. A failed upload is an event of the step (`trainer_state.put_or_note`)."""
    trainer_state.put_or_note(db.storage(), job_id, index, attempt, work, note=partial(_step_event, job_id, index))


def _step_ended(job_id: str, index: int, work: Path, settings: Settings) -> None:
    """Step `index` succeeded and the job goes on: its trainer checkpoints (optimizer state
    included), in this host's work folder `work` and in the store, are of no use any more, and the
    job's integrations get the step (`tracking.step_succeeded`). A step that fails or is cancelled
    ends its job with it: `_job_ended`. Never raises."""
    shutil.rmtree(work, ignore_errors=True)
    trainer_state.discard_step(db.storage(), job_id, index)
    tracking.step_succeeded(job_id, index, settings)


def _job_ended(job_id: str, settings: Settings | None = None, *, last_step: int | None = None) -> None:
    """The job succeeded, failed or was cancelled: no attempt of any of its steps resumes, so their
    stored trainer state goes, and its integrations get the end (`tracking.job_ended`: the final
    checkpoint, or the runs closed as failed or killed). `last_step`: the step whose success ended
    the job (its gate), tracked first. `settings`: the worker's (`get_settings()` when not given).
    Never raises.

    Done, it is recorded on the job (`end_transition_at`); until then the reaper does it again
    (`end_overdue_jobs`): a cancel's sdpo.job_ended message the broker lost, a worker that died
    between a job's end and this, a store that could not be reached. Tracking failures are the
    tracker's own (logged, tracking.py): they do not keep the transition due."""
    discarded = trainer_state.discard_job(db.storage(), job_id)
    if last_step is not None:
        tracking.step_succeeded(job_id, last_step, settings or get_settings())
    tracking.job_ended(job_id, settings)
    if not discarded:
        return
    try:
        _in_session(repository.mark_end_transition_done, job_id, what=f"record the end transition of {job_id}",
                    seconds=REAP_RETRY_SECONDS)
    except Exception:  # the database away: the reaper finds the job still due and does it again
        log.warning("%s: its end transition could not be recorded; the reaper will redo it", job_id, exc_info=True)


def end_job(job_id: str, *, settings: Settings, seconds: float | None = None) -> None:
    """The job's end transition (`_job_ended`) if the job has ended; nothing otherwise. Called where
    something else may have ended it:
      - task `sdpo.job_ended` (job_id): the API cancelled the job (core.jobs.lifecycle.cancel_job),
        maybe while none of its steps ran (queued, paused, between steps), so no worker saw the cancel;
      - after a failed attempt, or one the reaper found lost (`lifecycle.attempt_failed`,
        `lifecycle.requeue_stale_step`): the step's retries may be spent and the job failed.
    Idempotent: a redelivery, or a worker that also saw the end, discards nothing twice and the
    tracking end is written once. `seconds`: how long to retry the status read (`_in_session`)."""
    if _in_session(lambda s: getattr(repository.get_job(s, job_id), "status", None) in JOB_TERMINAL,
                   what=f"read the status of {job_id}", seconds=seconds):
        _job_ended(job_id, settings)


# ----------------------------------------------------------------------------------------------
# finalize_job


def finalize_job(job_id: str, *, settings: Settings) -> Outcome:
    """The job succeeded: register its final checkpoint as a model later jobs can start from."""
    name = _in_session(lifecycle.finalize_job, job_id, what=f"finalize {job_id}")
    if name is None:
        return Outcome.STOP
    shutil.rmtree(workdir.job_work_dir(settings, job_id), ignore_errors=True)
    _job_ended(job_id, settings)
    return Outcome.CONTINUE


# ----------------------------------------------------------------------------------------------
# reap: steps whose worker died, and work whose message the broker lost


def reap(*, settings: Settings, app: Celery, startup: bool = False) -> int:
    """Requeue running steps whose heartbeat is stale (their worker died), then re-send the work
    that the broker lost. Returns how many jobs were requeued or re-sent.

    The broker is not the truth: a SIGKILLed worker's message may be gone (no server-less
    transport redelivers) or come back only after the visibility timeout, and a broker restarted
    without persistence forgets every queued message. The step rows say what was running and what
    waits; a new chain from the first unfinished step is sent, and the claim makes any late
    redelivery harmless. Past `max_step_attempts` the job fails instead.
    """
    requeued = requeue_stale_steps(settings, app) + resend_lost_work(settings, app, startup=startup)
    end_overdue_jobs(settings)
    return requeued


def _reap_retry_seconds(settings: Settings) -> float:
    # The reaper runs every few seconds: a short retry, then the next tick tries again.
    return min(settings.db_retry_seconds, REAP_RETRY_SECONDS)


def _stale_cutoff(settings: Settings) -> datetime:
    return utcnow() - timedelta(seconds=settings.step_stale_seconds)


def requeue_stale_steps(settings: Settings, app: Celery) -> int:
    """Requeue the stale running step of each job (`lifecycle.requeue_stale_step`); one whose
    retries that spent fails its job, which then goes through the job's end transition as a job
    failed by its worker does. Returns how many steps were requeued."""
    seconds = _reap_retry_seconds(settings)
    stale = _in_session(lambda s: repository.jobs_with_stale_steps(s, _stale_cutoff(settings)),
                        what="find stale steps", seconds=seconds)
    requeued = 0
    for job_id in stale:
        if _in_session(lambda s, job_id=job_id: lifecycle.requeue_stale_step(
                           s, app, job_id, _stale_cutoff(settings), max_attempts=settings.max_step_attempts),
                       what=f"requeue stale steps of {job_id}", seconds=seconds):
            requeued += 1
        else:  # its step beat meanwhile, or its retries are spent and the job failed
            end_job(job_id, settings=settings, seconds=seconds)
    return requeued


def end_overdue_jobs(settings: Settings) -> int:
    """Do the end transition (`_job_ended`) of each job that ended more than `step_stale_seconds` ago
    without it: nothing else would ever discard its stored trainer state or close its tracked runs.
    Returns how many it found due."""
    seconds = _reap_retry_seconds(settings)
    due = _in_session(lambda s: repository.jobs_with_end_transition_due(s, _stale_cutoff(settings)),
                      what="find jobs whose end transition is due", seconds=seconds)
    for job_id in due:
        log.warning("%s ended without its end transition (a lost sdpo.job_ended message, or its worker "
                    "died); doing it now", job_id)
        _job_ended(job_id, settings)
    return len(due)


def resend_lost_work(settings: Settings, app: Celery, *, startup: bool = False) -> int:
    """Re-send a chain for each job that waits for a message the broker no longer holds.

    A job waits when it is queued or running, none of its steps runs, and nothing has happened to
    it for `step_stale_seconds` (a chain hop or a send after a commit takes far less). Whether the
    broker still holds a message for it is asked of the broker itself (`worker.broker`); a broker
    that cannot be asked is trusted, except at a worker's start-up.
    """
    seconds = _reap_retry_seconds(settings)
    waiting = _in_session(lambda s: repository.jobs_waiting_on_message(s, _stale_cutoff(settings)),
                          what="find waiting jobs", seconds=seconds)
    if not waiting:
        return 0
    held = broker.jobs_with_messages(settings, waiting, startup=startup)
    lost = [job_id for job_id in waiting if held is not None and job_id not in held]
    count = sum(_in_session(lambda s, job_id=job_id: lifecycle.resend_lost_chain(s, app, job_id,
                                                                                 _stale_cutoff(settings)),
                            what=f"re-send {job_id}", seconds=seconds) for job_id in lost)
    if count:
        log.warning("re-sent %d job(s) whose broker message was lost", count)
    return count
