"""The orchestration of a job, one function per task: prepare, run one step, finalise, reap.

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
  is registered or left under the checkpoint's name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path

from sqlalchemy import func, select, update

from core import ids
from core.clock import utcnow
from core.jobs import add_event, fine_tuned_model_name, get_job, get_steps, remaining_step_indexes
from core.models import Checkpoint, Event, File, Job, JobStep, RegisteredModel
from core.queue import enqueue_after_commit, job_chain, make_celery
from core.settings import get_settings
from core.states import JOB_TERMINAL, STEP_TERMINAL, JobStatus, StepStatus, sources, transition
from sdpo_engine.data import DataError, load_numbered_pairs, load_pairs, pair_rows, validate_file
from sdpo_engine.manifest import read_manifest, verify_checkpoint
from sdpo_engine.markup import check_pairs, read_tokenizer_files
from sdpo_engine.partition import PartitionError, partition, source_order
from sdpo_engine.protocol import TRAINING_DATA_CODES, ExitCode
from worker import broker, db
from worker.supervisor import CANCEL, GO, PAUSE, child_environment, engine_command, supervise

log = logging.getLogger(__name__)

EXIT_STOPPED, EXIT_BAD_INPUT, EXIT_NON_FINITE = ExitCode.STOPPED, ExitCode.BAD_INPUT, ExitCode.NON_FINITE
TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a trainer checkpoint
REAP_RETRY_SECONDS = 15.0
_PATH = re.compile(r"(/[^\s:'\"]+)+")  # server paths stay out of the errors users read
EVENT_ID_KEY = "_event_id"  # set by the relay on each engine event: its id in the events table


class Outcome(Enum):
    CONTINUE = "continue"
    STOP = "stop"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ----------------------------------------------------------------------------------------------
# Paths: everything a step reads or writes, derived from ids.


def _local(uri: str) -> Path:
    """A local path for a storage URI or a `file://` path of a registered model."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return db.storage().local_path(uri)


def step_work_dir(job_id: str, index: int) -> Path:
    # In the store's folder, not the worker's: a resumed attempt may run on another host that
    # shares the store, and must find the trainer checkpoint there.
    return get_settings().storage_dir / "work" / job_id / f"step-{index}"


def text_options(job: Job) -> tuple[str, str | None]:
    """(text_format, chat_template) of a job: ``method.<type>.text_format`` ("chat" unless "raw") and
    ``method.<type>.chat_template`` (None: the model's own)."""
    method = job.method or {}
    options = method.get(method.get("type") or "") or {}
    return options.get("text_format") or "chat", options.get("chat_template")


def _base_model_source(session, job: Job) -> tuple[str, str, Path]:
    """(source, model id, path) of the job's starting model, read inside a transaction."""
    if job.initial_checkpoint_id:
        ckpt = session.get(Checkpoint, job.initial_checkpoint_id)
        return "checkpoint", ckpt.id, _local(ckpt.uri)
    model = session.get(RegisteredModel, job.model_id)
    path = _local(model.uri) if model.uri.startswith(("file://", "local://")) else Path(model.uri)
    return model.source, model.id, path


def _materialize(source: tuple[str, str, Path]) -> Path:
    """A plain HF directory for the starting model: GGUF is converted once (outside any transaction,
    it takes a while) into the shared store, so every worker host reuses it."""
    kind, model_id, path = source
    if kind == "gguf":
        return _convert_gguf(model_id, path)
    return path


def _convert_gguf(model_id: str, gguf_path: Path) -> Path:
    import hashlib
    import subprocess

    key = hashlib.sha256(f"{gguf_path}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_id)
    out = get_settings().storage_dir / "models" / f"{safe}-{key}"
    if not (out / "config.json").is_file():
        done = subprocess.run(engine_command("base-model", str(gguf_path), str(out)), capture_output=True, text=True,
                              env=child_environment())
        if done.returncode != 0 and not (out / "config.json").is_file():
            raise RuntimeError(f"converting {gguf_path} failed: {done.stderr[-1000:]}")
    return out


# ----------------------------------------------------------------------------------------------
# prepare_job


def prepare_job(job_id: str) -> Outcome:
    """Build the chunks (partitioned jobs), move the job to running, queue the first step."""

    def read():
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                return None  # cancelled, paused or finished before it started
            steps = get_steps(s, job_id)
            files = [job.training_file_id] + [st.training_file_id for st in steps if st.training_file_id]
            if job.validation_file_id:
                files.append(job.validation_file_id)
            files = list(dict.fromkeys(files))
            return {"needs_chunks": bool(job.partition) and any(st.chunk_uri is None for st in steps),
                    "plan": dict(job.partition or {}),
                    "train_uri": s.get(File, job.training_file_id).storage_uri,
                    "files": [(f, s.get(File, f).storage_uri) for f in files],
                    "base_source": _base_model_source(s, job), "text": text_options(job),
                    "started": job.status == JobStatus.RUNNING,
                    "max_length": job.hyperparameters.get("max_length", 512), "seed": job.seed}

    found = db.retrying(read, what=f"prepare {job_id}")
    if found is None:
        return Outcome.STOP
    plan = found["plan"]
    base: Path | None = None
    if not found["started"]:
        # Before any chunk or step: every file against the model's tokenizer (markup in the text,
        # message lists without a chat template), so a job that cannot train as asked fails here.
        try:
            base = _materialize(found["base_source"])
        except (OSError, RuntimeError) as e:
            return _fail_job(job_id, None, "invalid_model", f"The model {found['base_source'][1]} could not be "
                             f"prepared for training: {_PATH.sub('<path>', str(e))[:500]}")
        refused = _check_text(found["files"], base, found["base_source"][1], *found["text"],
                              source_field=plan.get("source_field") or "source")
        if refused is not None:
            return _fail_job(job_id, None, *refused)
    written: list[tuple[str, dict]] = []
    if found["needs_chunks"]:
        strategy = plan.get("strategy")
        if strategy in ("easy_to_hard", "hard_to_easy") and base is None:
            base = _materialize(found["base_source"])
        try:
            written, plan = _write_chunks(job_id, _local(found["train_uri"]), plan,
                                          base if strategy in ("easy_to_hard", "hard_to_easy") else None,
                                          found["max_length"], found["seed"], text=found["text"])
        except (PartitionError, ValueError) as e:
            return _fail_job(job_id, None, "partition_failed", str(e))

    def start():
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                for uri, _ in written:
                    db.storage().delete(uri)
                return Outcome.STOP
            steps = get_steps(s, job_id, for_update=True)
            if written and all(st.chunk_uri is None for st in steps):
                for st, (uri, stats) in zip(steps, written, strict=True):
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
                add_event(s, job_id, f"Job started: {job.n_steps} step(s){desc}{order}.",
                          data={"partition": plan} if plan else None)
            return Outcome.CONTINUE

    return db.retrying(start, what=f"start {job_id}")


def _check_text(files: list[tuple[str, str]], base: Path, model_id: str, text_format: str,
                chat_template: str | None, *, source_field: str) -> tuple[str, str] | None:
    """(code, message) for the first file the model's tokenizer refuses (markup.check_pairs), or None.

    Reads the tokenizer's saved files only (no transformers in this process); the step checks again
    with the loaded tokenizer before it trains.
    """
    tokenizer = read_tokenizer_files(base)
    if tokenizer is None:
        return None  # no tokenizer files to read: the step's own check (with the loaded tokenizer) decides
    if chat_template:
        tokenizer.chat_template = chat_template
    for file_id, uri in files:
        path = _local(uri)
        try:
            numbered = load_numbered_pairs(path, source_field=source_field)
        except DataError as e:
            return "invalid_training_data", f"File {file_id}: {e}"
        fmt = validate_file(path, source_field=source_field, max_errors=1)["format"]
        checked = check_pairs(numbered, fmt=fmt, tokenizer=tokenizer, text_format=text_format, model_name=model_id)
        if not checked["valid"]:
            first = checked["errors"][0]
            where = f"line {first['line']}, {first['field']}: " if first["line"] else ""
            more = checked["error_count"] - 1
            return checked["code"], (f"File {file_id} cannot be trained on {model_id}: {where}{first['reason']}"
                                     + (f" ({more} more problem(s) of this kind in the file)" if more > 0 else ""))
    return None


def _write_chunks(job_id: str, train_path: Path, plan: dict, base: Path | None, max_length: int, seed: int,
                  text: tuple[str, str | None] = ("chat", None)):
    """Partition the training file into T chunks in storage. Returns [(uri, stats)], plan."""
    import subprocess

    source_field = plan.get("source_field") or "source"
    pairs = load_pairs(train_path, source_field=source_field)
    scores = None
    if base is not None:
        text_format, chat_template = text
        extra = ["--text-format", text_format]
        if chat_template:
            template_file = step_work_dir(job_id, 0).parent / "chat_template.jinja"
            template_file.parent.mkdir(parents=True, exist_ok=True)
            template_file.write_text(chat_template, encoding="utf-8")
            extra += ["--chat-template-file", str(template_file)]
        done = subprocess.run(engine_command("score-sources", "--model", str(base), "--file", str(train_path),
                                             "--max-length", str(max_length), "--source-field", source_field,
                                             "--device", get_settings().device, *extra),
                              capture_output=True, text=True, env=child_environment())
        if done.returncode != 0:
            raise ValueError(f"scoring the sources failed: {done.stderr.strip().splitlines()[-1:]}")
        scores = json.loads(done.stdout.strip().splitlines()[-1])
        plan = {**plan, "source_scores": scores, "source_order": source_order(scores, plan["strategy"])}
    chunks = partition(pairs, plan["strategy"], plan["n_steps"], seed=seed, sizes=plan.get("sizes"),
                       source_scores=scores)
    out = []
    for k, idx in enumerate(chunks, start=1):
        rows = [pairs[i] for i in idx]
        # pair_rows: a chunk of a string file stays a string file (what the step's own checks read)
        body = (json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in pair_rows(rows))
        stored = db.storage().save_stream(f"chunks/{job_id}/step-{k}.jsonl", body)
        sources = Counter(r.get("source") or "(none)" for r in rows)
        out.append((stored.uri, {"rows": len(rows), "sources": dict(sorted(sources.items())),
                                 "sha256": stored.sha256, "bytes": stored.bytes}))
    return out, plan


# ----------------------------------------------------------------------------------------------
# run_step


@dataclass
class _Claim:
    """What a claimed attempt needs, read in the claim's transaction."""

    step_id: str
    attempt: int
    n_steps: int
    reference_id: str | None
    job_model: str
    owner: str
    base_source: tuple[str, str, Path]
    policy_init: Path | None
    train_file: Path
    eval_file: Path | None
    hyperparameters: dict
    source_field: str
    recorded_global_step: int  # metrics of earlier attempts of this step go up to here
    text_format: str = "chat"
    chat_template: str | None = None


def run_step(job_id: str, index: int) -> Outcome:
    """Claim step `index`, train it in a child process, record its checkpoint."""
    settings = get_settings()
    me = worker_name()
    claim = db.retrying(lambda: _claim_step(job_id, index, me), what=f"claim step {index} of {job_id}")
    if isinstance(claim, Outcome):
        return claim
    try:
        return _train_claimed_step(job_id, index, claim, settings)
    except Exception as exc:
        # Whatever broke here (a model that would not convert, a full disk, the database away for
        # longer than db_retry_seconds) must not leave the step `running` until the reaper notices.
        log.exception("step %s of %s, attempt %s: the worker failed", index, job_id, claim.attempt)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        return _retry_or_fail(job_id, index, claim.attempt,
                              f"the worker failed: {type(exc).__name__}: {_PATH.sub('<path>', first_line)}")


def _train_claimed_step(job_id: str, index: int, claim: _Claim, settings) -> Outcome:
    attempt = claim.attempt
    base = _materialize(claim.base_source)
    policy_init = claim.policy_init or base
    # A checkpoint handed over through storage is checked against its manifest before it is
    # trained on: a truncated copy or a flipped byte must fail loudly, not train silently.
    if read_manifest(policy_init) is not None:
        problems = verify_checkpoint(policy_init)
        if problems:
            return _fail_job(job_id, index, "corrupt_checkpoint",
                             f"Step {index} failed: its initial checkpoint {claim.reference_id or claim.job_model} "
                             f"is corrupt ({'; '.join(problems[:3])})", attempt=attempt)
    work = step_work_dir(job_id, index)
    attempt_dir = work / f"attempt-{attempt}"
    out_dir = attempt_dir / "output"
    shutil.rmtree(attempt_dir, ignore_errors=True)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    resume_from = _hand_over_trainer_state(work, attempt)
    recorded = claim.recorded_global_step
    if resume_from is not None:
        recorded = db.retrying(lambda: _backfill_metrics(job_id, index, resume_from, recorded),
                               what=f"backfill metrics of step {index} of {job_id}")
    spec = {"index": index, "policy_init": str(policy_init), "train_file": str(claim.train_file),
            "output_dir": str(out_dir), "work_dir": str(attempt_dir / "trainer"),
            "hyperparameters": claim.hyperparameters,
            "eval_file": str(claim.eval_file) if claim.eval_file else None,
            "eval_reference": str(base) if claim.eval_file else None,
            "device": settings.device, "source_field": claim.source_field,
            "save_steps": settings.step_save_steps, "text_format": claim.text_format,
            "chat_template": claim.chat_template, "packing": settings.packing,
            "pad_to_multiple_of": settings.pad_to_multiple_of,
            "activation_checkpointing": settings.activation_checkpointing}
    spec_path = attempt_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    relay = _Relay(job_id, index, attempt, recorded)
    stopped_because: list[str] = []

    def heartbeat() -> None:
        with db.session() as s:
            s.execute(update(JobStep).where(JobStep.id == claim.step_id, JobStep.status == StepStatus.RUNNING.value,
                                            JobStep.attempt == attempt).values(heartbeat_at=utcnow()))

    def control() -> str:
        with db.session() as s:
            job_status = s.scalar(select(Job.status).where(Job.id == job_id))
            row = s.execute(select(JobStep.status, JobStep.attempt).where(JobStep.id == claim.step_id)).one()
        if job_status in (JobStatus.CANCELLED, JobStatus.FAILED) or row.status == StepStatus.CANCELLED:
            stopped_because.append("cancelled")
            return CANCEL
        if row.status != StepStatus.RUNNING or row.attempt != attempt:
            stopped_because.append("superseded")
            return CANCEL  # the reaper gave this step to another attempt: this one must stop
        if job_status == JobStatus.PAUSING:
            return PAUSE
        return GO

    outcome = supervise(engine_command("step", str(spec_path)), log_path=attempt_dir / "engine.log",
                        relay=relay, control=control, heartbeat=heartbeat,
                        heartbeat_seconds=settings.step_heartbeat_seconds,
                        poll_seconds=min(1.0, settings.step_heartbeat_seconds),
                        flush_seconds=settings.db_retry_seconds, warm=settings.warm_engine)
    log.info("step %s of %s: engine process exited %s (%s start)", index, job_id, outcome.returncode,
             "warm" if outcome.warm else "cold")

    if outcome.action == CANCEL:
        shutil.rmtree(out_dir, ignore_errors=True)
        if stopped_because[:1] == ["superseded"]:
            # Another attempt owns the step now and takes its trainer state from this folder.
            log.warning("step %s of %s: attempt %s superseded by a newer attempt; stopped", index, job_id, attempt)
            return Outcome.STOP
        shutil.rmtree(work.parent, ignore_errors=True)  # the job is over: its trainer state goes
        db.retrying(lambda: _event(job_id, f"Step {index} stopped: the job was cancelled.", step_index=index),
                    what="record a cancel")
        return Outcome.STOP
    if outcome.returncode == EXIT_STOPPED:
        return _paused(job_id, claim.step_id, index, attempt, outcome)
    if outcome.returncode != 0 or outcome.result is None:
        err = outcome.error or {}
        message = err.get("message") or _exit_description(outcome.returncode)
        if not err and outcome.tail:
            message += ": " + outcome.tail[-1][:500]
        if outcome.returncode == EXIT_NON_FINITE or err.get("code") == "non_finite":
            # The same model, data and hyperparameters give the same NaN: no retry, nothing registered.
            shutil.rmtree(out_dir, ignore_errors=True)
            return _fail_job(job_id, index, "non_finite", f"Step {index} failed: {message}", attempt=attempt)
        if outcome.returncode == EXIT_BAD_INPUT:  # bad spec or data: no retry can help
            code = err.get("code") if err.get("code") in TRAINING_DATA_CODES else "invalid_training_data"
            return _fail_job(job_id, index, code, f"Step {index} failed: {message}", attempt=attempt)
        return _retry_or_fail(job_id, index, attempt, f"the training process failed ({message})")
    return _succeeded(job_id, claim.step_id, index, attempt, claim.owner, out_dir, outcome, work)


def _claim_step(job_id: str, index: int, me: str) -> _Claim | Outcome:
    now = utcnow()
    with db.session() as s:
        job = get_job(s, job_id, for_update=True)
        if job is None:
            return Outcome.STOP
        if job.status == JobStatus.PAUSING:  # the previous step finished as the pause came in
            transition(job, JobStatus.PAUSED)
            add_event(s, job_id, "Job paused between steps.")
            return Outcome.STOP
        if job.status != JobStatus.RUNNING:
            return Outcome.STOP
        steps = {st.index: st for st in get_steps(s, job_id)}
        step = steps[index]
        if step.status == StepStatus.SUCCEEDED:
            return Outcome.CONTINUE  # a redelivered task of a finished step: let the chain go on
        previous = steps.get(index - 1)
        if previous is not None and previous.status != StepStatus.SUCCEEDED:
            return Outcome.STOP  # never train on a reference that does not exist yet
        reference_id = previous.output_checkpoint_id if previous else job.initial_checkpoint_id
        # The claim: one conditional UPDATE. A duplicate or redelivered task finds the step no
        # longer queued, updates nothing, and exits without training.
        claimed = s.execute(
            update(JobStep)
            .where(JobStep.id == step.id, JobStep.status.in_([st.value for st in sources(StepStatus.RUNNING)]))
            .values(status=StepStatus.RUNNING.value, attempt=JobStep.attempt + 1, worker=me, heartbeat_at=now,
                    started_at=step.started_at or now, updated_at=now, reference_checkpoint_id=reference_id,
                    policy_init_checkpoint_id=reference_id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != 1:
            return Outcome.STOP
        s.refresh(step)
        job.current_step = index
        job.updated_at = now
        recorded = s.scalar(select(func.max(Event.data["global_step"].as_integer())).where(
            Event.job_id == job_id, Event.step_index == index, Event.type == "metrics")) or 0
        claim = _Claim(
            step_id=step.id, attempt=step.attempt, n_steps=job.n_steps, reference_id=reference_id,
            job_model=job.model, owner=job.owner, base_source=_base_model_source(s, job),
            policy_init=_local(s.get(Checkpoint, reference_id).uri) if previous is not None else None,
            train_file=_local(step.chunk_uri) if step.chunk_uri else _local(
                s.get(File, step.training_file_id).storage_uri),
            eval_file=_local(s.get(File, job.validation_file_id).storage_uri) if job.validation_file_id else None,
            hyperparameters=dict(step.hyperparameters),
            source_field=(job.partition or {}).get("source_field") or "source",
            recorded_global_step=int(recorded), text_format=text_options(job)[0], chat_template=text_options(job)[1])
        add_event(s, job_id, f"Step {index}/{job.n_steps} started (attempt {claim.attempt}) on {me}; reference and "
                  f"initial policy: {reference_id or job.model}.", step_index=index,
                  data={"reference_checkpoint": reference_id, "attempt": claim.attempt, "worker": me})
        return claim


def _hand_over_trainer_state(work: Path, attempt: int) -> Path | None:
    """Seed this attempt's trainer folder with the newest complete trainer checkpoint of an earlier
    attempt (paused, or its worker died); returns it, or None to start afresh.

    Each attempt trains in a folder of its own, so an attempt that was written off but still runs
    (its worker lost the database for longer than `step_stale_seconds`) never writes where the
    new attempt reads. The files are hard links: no copy of optimizer states, and the old folders
    can go at once. A checkpoint is complete when it has `trainer_state.json`, which transformers
    writes last: one cut off by a kill is never resumed from.
    """
    best: tuple[int, Path] | None = None
    for folder in work.glob("attempt-*/trainer/checkpoint-*"):
        number = folder.name.rsplit("-", 1)[-1]
        if not number.isdigit() or not (folder / TRAINER_STATE).is_file():
            continue
        if best is None or int(number) > best[0]:
            best = (int(number), folder)
    mine = work / f"attempt-{attempt}" / "trainer"
    if best is not None:
        mine.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(best[1], mine / best[1].name, copy_function=os.link)
        except OSError:  # a store without hard links
            shutil.rmtree(mine / best[1].name, ignore_errors=True)
            shutil.copytree(best[1], mine / best[1].name)
    for old in work.glob("attempt-*"):
        if old.name != f"attempt-{attempt}":
            shutil.rmtree(old, ignore_errors=True)
    return mine / best[1].name if best else None


def _backfill_metrics(job_id: str, index: int, checkpoint: Path, recorded: int) -> int:
    """Write the metrics of optimizer steps that a trainer checkpoint holds but the events lack.

    A worker that dies takes the events it had not yet written with it (at most half a second's),
    and the training child it leaves keeps training until it has saved (SIGTERM). The checkpoint's
    `trainer_state.json` logs every optimizer step up to it, so those steps are written from there
    (marked `backfilled`). Returns the global step the events now reach.
    """
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return recorded
    missing = [h for h in state.get("log_history", [])
               if isinstance(h.get("step"), int) and h["step"] > recorded and "loss" in h and "train_runtime" not in h]
    if not missing:
        return recorded
    with db.session() as s:
        done = set(s.scalars(select(Event.data["global_step"].as_integer()).where(
            Event.job_id == job_id, Event.step_index == index, Event.type == "metrics")))
        for h in missing:
            if h["step"] in done:
                continue
            data = {"step": index, "global_step": h["step"], "max_steps": state.get("max_steps"),
                    **{k: _finite(v) for k, v in h.items() if k != "step"}, "tokens_per_second": None,
                    "backfilled": True}
            add_event(s, job_id, f"Step {index}: global step {h['step']}/{state.get('max_steps')}, loss "
                      f"{_f(h.get('loss'))}", type="metrics", step_index=index, data=data)
    return max(recorded, max(h["step"] for h in missing))


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was killed by {name}"
    return f"the training process exited with {returncode}"


class _Relay:
    """Writes the child's JSON lines into the job's events, safe to call again with the same events.

    The supervisor calls it again with the same (and newer) events when the database did not
    answer; each event gets its id the first time it is seen, and ids already committed (a COMMIT
    whose answer was lost) are skipped. Metrics of optimizer steps that an earlier attempt already
    recorded are not written again: a resumed attempt redoes the steps since its trainer
    checkpoint, and the log keeps one metrics event per optimizer step.
    """

    def __init__(self, job_id: str, index: int, attempt: int, recorded_global_step: int):
        self.job_id, self.index, self.attempt = job_id, index, attempt
        self.recorded = recorded_global_step

    def __call__(self, events: list[dict]) -> None:
        for e in events:
            e.setdefault(EVENT_ID_KEY, ids.new_id(ids.EVENT))
        with db.session() as s:
            wanted = [e[EVENT_ID_KEY] for e in events]
            done = set()
            for start in range(0, len(wanted), 500):
                done |= set(s.scalars(select(Event.id).where(Event.id.in_(wanted[start:start + 500]))))
            for e in events:
                if e[EVENT_ID_KEY] not in done:
                    self._record(s, e)

    def _record(self, s, e: dict) -> None:
        index, job_id, event_id = self.index, self.job_id, e[EVENT_ID_KEY]
        fields = {k: v for k, v in e.items() if k not in ("event", EVENT_ID_KEY)}
        kind = e.get("event")
        if kind == "metrics":
            global_step = e.get("global_step")
            if isinstance(global_step, int) and global_step <= self.recorded:
                return
            loss = e.get("loss")
            msg = f"Step {index}: global step {global_step}/{e.get('max_steps')}"
            if isinstance(loss, (int, float)):
                msg += f", loss {loss:.4f}"
            add_event(s, job_id, msg, type="metrics", step_index=index, data=fields, event_id=event_id)
        elif kind == "info" and e.get("phase") == "resume":
            at = _checkpoint_step(e.get("checkpoint"))
            text = f"Step {index}: attempt {self.attempt} resumes from its trainer checkpoint at global step {at}"
            if at is not None and self.recorded > at:
                text += (f"; global steps {at + 1}-{self.recorded} are trained again (their metrics, recorded by "
                         "the earlier attempt, are not repeated)")
            add_event(s, job_id, text + ".", step_index=index, event_id=event_id,
                      data={**fields, "checkpoint": Path(str(e.get("checkpoint"))).name, "global_step": at,
                            "redo_until": max(self.recorded, at or 0), "attempt": self.attempt})
        elif kind == "info" and e.get("phase") in ("start", "reference_logps", "eval", "train_end"):
            text = {"start": f"Step {index}: {e.get('pairs')} pairs on {e.get('device')}",
                    "reference_logps": f"Step {index}: reference log-probs precomputed, mean gamma_ref "
                                       f"{_f(e.get('mean_gamma_ref'))}",
                    "eval": f"Step {index}: held-out reward accuracy {_f(e.get('reward_accuracy'))}",
                    "train_end": f"Step {index}: training finished"}[e["phase"]]
            add_event(s, job_id, text, step_index=index, data=fields, event_id=event_id)
        elif kind == "info" and e.get("phase") == "pairs_dropped":
            dropped = e.get("pairs_dropped") or {}
            parts = [f"{v.get('count')} {reason.replace('_', ' ')} (lines {', '.join(map(str, v.get('lines') or []))})"
                     for reason, v in dropped.items()]
            add_event(s, job_id, f"Step {index}: {sum(v.get('count', 0) for v in dropped.values())} of {e.get('pairs')} "
                      f"pair(s) dropped, no training signal at max_length={e.get('max_length')}: {'; '.join(parts)}.",
                      level="warn", step_index=index, data=fields, event_id=event_id)
        elif kind == "error":
            add_event(s, job_id, f"Step {index}: {e.get('message')}", level="error", step_index=index,
                      data=fields, event_id=event_id)
        elif kind == "warning":  # e.g. first_loss_not_ln2: the step goes on, the user is told
            add_event(s, job_id, f"Step {index}: warning: {e.get('message')}", level="warn", step_index=index,
                      data=fields, event_id=event_id)


def _finite(value):
    """JSON columns refuse NaN and infinities (transformers may log them): None instead."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _checkpoint_step(path) -> int | None:
    number = Path(str(path or "")).name.rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else None


def _succeeded(job_id, step_id, index, attempt, owner, out_dir: Path, outcome, work: Path) -> Outcome:
    summary = outcome.result["summary"]
    manifest = read_manifest(out_dir)
    if manifest is None:
        return _fail_job(job_id, index, "step_failed", f"Step {index} wrote no checkpoint manifest", attempt=attempt)
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    # Into the store first, then the row: a checkpoint row always names complete files. The output
    # folder is complete (the engine renamed it into place) and lives under the store's root, so it
    # moves in by a rename, not a copy of the weights; a failed move leaves nothing under that name.
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    try:
        uri = db.storage().move_tree(out_dir, f"checkpoints/{job_id}/{checkpoint_id}")
    except OSError as exc:
        log.error("step %s of %s: storing checkpoint %s failed", index, job_id, checkpoint_id, exc_info=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        reason = describe_os_error(exc)
        return _fail_job(job_id, index, "checkpoint_write_failed",
                         f"Step {index} failed: its checkpoint could not be written to the checkpoint store "
                         f"({reason}). Nothing was registered; free space or fix the store, then start a new "
                         "job (or branch from the last good checkpoint).", attempt=attempt)
    metrics = {k: summary.get(k) for k in ("first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy",
                                           "reward_margin", "eval", "pairs", "pairs_used", "pairs_dropped",
                                           "train_seconds", "global_steps")}
    metrics["num_tokens"] = (outcome.last_metrics or {}).get("num_tokens")
    event_id = ids.new_id(ids.EVENT)

    def record() -> Outcome:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            steps = {st.index: st for st in get_steps(s, job_id, for_update=True)}
            step = steps[index]
            if step.output_checkpoint_id == checkpoint_id:
                return Outcome.CONTINUE  # an earlier try committed, its answer was lost
            if step.status != StepStatus.RUNNING or step.attempt != attempt:
                db.storage().delete(uri)  # cancelled or handed to another attempt meanwhile
                return Outcome.STOP
            s.add(Checkpoint(id=checkpoint_id, owner=owner, job_id=job_id, step_index=index, uri=uri,
                             sha256=manifest["checkpoint_sha256"], bytes=size, metrics=metrics))
            s.flush()
            step.output_checkpoint_id = checkpoint_id
            step.metrics = metrics
            step.error = None
            transition(step, StepStatus.SUCCEEDED)
            nxt = steps.get(index + 1)
            if nxt is not None and nxt.status == StepStatus.PENDING and job.status == JobStatus.RUNNING:
                transition(nxt, StepStatus.QUEUED)
            job.updated_at = utcnow()
            add_event(s, job_id, f"Step {index} succeeded: checkpoint {checkpoint_id}, first loss "
                      f"{_f(metrics['first_loss'])}, last loss {_f(metrics['last_loss'])}, mean gamma_ref "
                      f"{_f(metrics['mean_gamma_ref'])}.", step_index=index,
                      data={"checkpoint": checkpoint_id, **metrics}, event_id=event_id)
            return Outcome.CONTINUE

    try:
        result = db.retrying(record, what=f"record step {index} of {job_id}")
    except BaseException:
        db.storage().delete(uri)
        raise
    if result is Outcome.CONTINUE:
        # The trainer checkpoints (optimizer state included) are of no use once the step is done.
        shutil.rmtree(work, ignore_errors=True)
    return result


def describe_os_error(exc: OSError) -> str:
    """The reason of a failed write without the store's paths ("No space left on device")."""
    if exc.errno:
        return os.strerror(exc.errno)
    # shutil.copytree gathers the failed files into one shutil.Error: [(src, dst, "[Errno 28] …"), …]
    found = re.search(r"\[Errno (\d+)\]", str(exc.args[0] if exc.args else ""))
    return os.strerror(int(found.group(1))) if found else type(exc).__name__


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _paused(job_id, step_id, index, attempt, outcome) -> Outcome:
    """The child saved its trainer state and exited (a pause, or a SIGTERM from elsewhere)."""
    app = make_celery(get_settings())
    at = (outcome.stopped or {}).get("global_step")
    event_id = ids.new_id(ids.EVENT)

    def record() -> Outcome:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            step = s.get(JobStep, step_id, with_for_update=True)
            if step.status != StepStatus.RUNNING or step.attempt != attempt:
                return Outcome.STOP  # recorded by an earlier try, cancelled, or another attempt's
            transition(step, StepStatus.QUEUED)
            if job.status == JobStatus.PAUSING:
                transition(job, JobStatus.PAUSED)
                add_event(s, job_id, f"Step {index} paused at global step {at}; it resumes from its trainer "
                          "checkpoint.", step_index=index, data=outcome.stopped, event_id=event_id)
            elif job.status == JobStatus.RUNNING:
                # Stopped without a pause (a SIGTERM from outside): run it again from its checkpoint.
                add_event(s, job_id, f"Step {index} stopped at global step {at} without a pause request; "
                          "requeued to resume from its trainer checkpoint.", level="warn", step_index=index,
                          data=outcome.stopped, event_id=event_id)
                job.updated_at = utcnow()
                enqueue_after_commit(s, job_chain(app, job_id, remaining_step_indexes(get_steps(s, job_id))))
            return Outcome.STOP

    return db.retrying(record, what=f"record the pause of step {index} of {job_id}")


def _requeue_or_fail_step(s, app, job: Job, steps: list[JobStep], step: JobStep, reason: str) -> bool:
    """In the caller's transaction: after a failed or lost attempt, requeue `step` (a new chain from
    it is sent after the commit) or, past `max_step_attempts`, fail it and the job. True if requeued."""
    settings = get_settings()
    step.failed_attempts = failures = step.failed_attempts + 1
    if failures >= settings.max_step_attempts:
        message = (f"Step {step.index} failed after {failures} attempt{'s' if failures != 1 else ''} "
                   f"(max_step_attempts={settings.max_step_attempts}); the last one: {reason}.")
        step.error = {"code": "retries_exhausted", "message": message}
        transition(step, StepStatus.FAILED)
        for later in steps:
            if later.status not in STEP_TERMINAL:
                transition(later, StepStatus.CANCELLED)
        if job.status not in JOB_TERMINAL:
            job.error = {"code": "retries_exhausted", "message": message, "param": None}
            transition(job, JobStatus.FAILED)
        add_event(s, job.id, message, level="error", step_index=step.index, data={"code": "retries_exhausted"})
        return False
    transition(step, StepStatus.QUEUED)
    job.updated_at = utcnow()
    data = {"failed_attempt": step.attempt, "reason": reason}
    if job.status == JobStatus.PAUSING:
        transition(job, JobStatus.PAUSED)
        add_event(s, job.id, f"Step {step.index}: attempt {step.attempt} ended ({reason}); the job is paused and "
                  "resumes from the step's last trainer checkpoint.", level="warn", step_index=step.index, data=data)
        return True
    add_event(s, job.id, f"Step {step.index}: attempt {step.attempt} ended ({reason}); requeued for attempt "
              f"{step.attempt + 1} of {settings.max_step_attempts}, resuming from its last trainer checkpoint.",
              level="warn", step_index=step.index, data=data)
    enqueue_after_commit(s, job_chain(app, job.id, remaining_step_indexes(steps)))
    return True


def _retry_or_fail(job_id: str, index: int, attempt: int, reason: str) -> Outcome:
    app = make_celery(get_settings())

    def record() -> Outcome:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            steps = get_steps(s, job_id, for_update=True)
            step = next(st for st in steps if st.index == index)
            if job is None or step.status != StepStatus.RUNNING or step.attempt != attempt:
                return Outcome.STOP
            _requeue_or_fail_step(s, app, job, steps, step, reason)
            return Outcome.STOP

    return db.retrying(record, what=f"requeue step {index} of {job_id}")


def _event(job_id: str, message: str, **kwargs) -> None:
    with db.session() as s:
        add_event(s, job_id, message, **kwargs)


def _fail_job(job_id: str, index: int | None, code: str, message: str, *, attempt: int | None = None) -> Outcome:
    """The job fails with a readable error; its unfinished steps are cancelled (the failed one failed)."""

    def record() -> Outcome:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            if job is None or job.status in JOB_TERMINAL:
                return Outcome.STOP
            for st in get_steps(s, job_id, for_update=True):
                if st.status in STEP_TERMINAL:
                    continue
                if st.index == index and st.status == StepStatus.RUNNING:
                    st.error = {"code": code, "message": message}
                    transition(st, StepStatus.FAILED)
                else:
                    transition(st, StepStatus.CANCELLED)
            job.error = {"code": code, "message": message, "param": None}
            transition(job, JobStatus.FAILED)
            add_event(s, job_id, message, level="error", step_index=index, data={"code": code})
            return Outcome.STOP

    return db.retrying(record, what=f"fail {job_id}")


# ----------------------------------------------------------------------------------------------
# finalize_job


def finalize_job(job_id: str) -> Outcome:
    """The job succeeded: register its final checkpoint as a model later jobs can start from."""

    def record() -> Outcome:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            if job is None or job.status == JobStatus.SUCCEEDED:
                return Outcome.STOP
            steps = get_steps(s, job_id, for_update=True)
            if job.status not in (JobStatus.RUNNING, JobStatus.PAUSING) or any(
                    st.status != StepStatus.SUCCEEDED for st in steps):
                return Outcome.STOP
            final = s.get(Checkpoint, steps[-1].output_checkpoint_id)
            base = s.get(RegisteredModel, job.model_id)
            name = fine_tuned_model_name(job)
            if s.get(RegisteredModel, name) is None:
                s.add(RegisteredModel(id=name, owner=job.owner, source="checkpoint", uri=final.uri,
                                      default_hyperparameters=dict(base.default_hyperparameters or {}),
                                      job_id=job.id, checkpoint_id=final.id))
            job.fine_tuned_model = name
            job.trained_tokens = sum(int((st.metrics or {}).get("num_tokens") or 0) for st in steps) or None
            job.current_step = job.n_steps
            transition(job, JobStatus.SUCCEEDED)
            add_event(s, job_id, f"Job succeeded: {name} (checkpoint {final.id}).",
                      data={"fine_tuned_model": name, "checkpoint": final.id})
            return Outcome.CONTINUE

    outcome = db.retrying(record, what=f"finalize {job_id}")
    if outcome is Outcome.CONTINUE:
        shutil.rmtree(get_settings().storage_dir / "work" / job_id, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------
# reap: steps whose worker died, and work whose message the broker lost


def reap(*, startup: bool = False) -> int:
    """Requeue running steps whose heartbeat is stale (their worker died), then re-send the work
    that the broker lost. Returns how many jobs were requeued or re-sent.

    The broker is not the truth: a SIGKILLed worker's message may be gone (no server-less
    transport redelivers) or come back only after the visibility timeout, and a broker restarted
    without persistence forgets every queued message. The step rows say what was running and what
    waits; a new chain from the first unfinished step is sent, and the claim makes any late
    redelivery harmless. Past `max_step_attempts` the job fails instead.
    """
    return requeue_stale_steps() + resend_lost_work(startup=startup)


def _reap_retry_seconds() -> float:
    # The reaper runs every few seconds: a short retry, then the next tick tries again.
    return min(get_settings().db_retry_seconds, REAP_RETRY_SECONDS)


def requeue_stale_steps() -> int:
    settings = get_settings()
    app = make_celery(settings)

    def find() -> list[str]:
        cutoff = utcnow() - timedelta(seconds=settings.step_stale_seconds)
        with db.session() as s:
            return sorted(set(s.scalars(select(JobStep.job_id).where(
                JobStep.status == StepStatus.RUNNING.value, JobStep.heartbeat_at < cutoff))))

    count = 0
    for job_id in db.retrying(find, what="find stale steps", seconds=_reap_retry_seconds()):

        def requeue(job_id=job_id) -> int:
            cutoff = utcnow() - timedelta(seconds=settings.step_stale_seconds)
            with db.session() as s:
                job = get_job(s, job_id, for_update=True)
                steps = get_steps(s, job_id, for_update=True)
                for st in steps:
                    if st.status != StepStatus.RUNNING or st.heartbeat_at is None or st.heartbeat_at >= cutoff:
                        continue
                    silent = int((utcnow() - st.heartbeat_at).total_seconds())
                    reason = f"its worker {st.worker} stopped answering for {silent} s"
                    return int(_requeue_or_fail_step(s, app, job, steps, st, reason))
                return 0

        count += db.retrying(requeue, what=f"requeue stale steps of {job_id}", seconds=_reap_retry_seconds())
    return count


def resend_lost_work(*, startup: bool = False) -> int:
    """Re-send a chain for each job that waits for a message the broker no longer holds.

    A job waits when it is queued or running, none of its steps runs, and nothing has happened to
    it for `step_stale_seconds` (a chain hop or a send after a commit takes far less). Whether the
    broker still holds a message for it is asked of the broker itself (`worker.broker`); a broker
    that cannot be asked is trusted, except at a worker's start-up.
    """
    settings = get_settings()

    def find() -> list[str]:
        cutoff = utcnow() - timedelta(seconds=settings.step_stale_seconds)
        with db.session() as s:
            busy = select(JobStep.job_id).where(JobStep.status == StepStatus.RUNNING.value)
            return list(s.scalars(select(Job.id).where(
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]), Job.updated_at < cutoff,
                Job.id.not_in(busy)).order_by(Job.created_at)))

    waiting = db.retrying(find, what="find waiting jobs", seconds=_reap_retry_seconds())
    if not waiting:
        return 0
    held = broker.jobs_with_messages(settings, waiting, startup=startup)
    lost = [job_id for job_id in waiting if held is not None and job_id not in held]
    app = make_celery(settings)
    count = 0
    for job_id in lost:

        def resend(job_id=job_id) -> int:
            cutoff = utcnow() - timedelta(seconds=settings.step_stale_seconds)
            with db.session() as s:
                job = get_job(s, job_id, for_update=True)
                if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or job.updated_at >= cutoff:
                    return 0
                steps = get_steps(s, job_id, for_update=True)
                if any(st.status == StepStatus.RUNNING for st in steps):
                    return 0
                remaining = remaining_step_indexes(steps)
                job.updated_at = utcnow()
                add_event(s, job_id, "The broker had lost this job's message; sent again from step "
                          f"{remaining[0] if remaining else job.n_steps}.", level="warn",
                          data={"remaining_steps": remaining})
                enqueue_after_commit(s, job_chain(app, job_id, remaining))
                return 1

        count += db.retrying(resend, what=f"re-send {job_id}", seconds=_reap_retry_seconds())
    if count:
        log.warning("re-sent %d job(s) whose broker message was lost", count)
    return count
