"""The orchestration of a job, one function per task: prepare, run one step, finalise, reap.

Every function takes ids, opens its own short transactions, and never holds a transaction open
while training runs (hours). Each returns `Outcome.CONTINUE` when the chain should go on to the
next task, or `Outcome.STOP` when it must not (the job failed, was cancelled or paused, or this
delivery was a duplicate): the Celery task turns STOP into `Ignore`, which ends the chain.

sDPO lives in `run_step`: the step's policy starts from the previous step's output checkpoint,
and the same checkpoint is its frozen reference (the base model for step 1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections import Counter
from datetime import timedelta
from enum import Enum
from pathlib import Path

from sqlalchemy import select, update

from core import ids
from core.clock import utcnow
from core.jobs import add_event, fine_tuned_model_name, get_job, get_steps
from core.models import Checkpoint, File, Job, JobStep, RegisteredModel
from core.queue import enqueue_after_commit, job_chain, make_celery
from core.settings import get_settings
from core.states import STEP_TERMINAL, JobStatus, StepStatus, sources, transition
from sdpo_engine.data import load_pairs
from sdpo_engine.manifest import read_manifest, verify_checkpoint
from sdpo_engine.partition import PartitionError, partition, source_order
from worker import db
from worker.supervisor import CANCEL, GO, PAUSE, engine_command, supervise

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # sdpo_engine.step.EXIT_STOPPED (not imported: that module imports TRL)
EXIT_BAD_INPUT = 2


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
        done = subprocess.run(engine_command("base-model", str(gguf_path), str(out)), capture_output=True, text=True)
        if done.returncode != 0 and not (out / "config.json").is_file():
            raise RuntimeError(f"converting {gguf_path} failed: {done.stderr[-1000:]}")
    return out


# ----------------------------------------------------------------------------------------------
# prepare_job


def prepare_job(job_id: str) -> Outcome:
    """Build the chunks (partitioned jobs), move the job to running, queue the first step."""
    with db.session() as s:
        job = get_job(s, job_id, for_update=True)
        if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return Outcome.STOP  # cancelled, paused or finished before it started
        steps = get_steps(s, job_id)
        needs_chunks = bool(job.partition) and any(st.chunk_uri is None for st in steps)
        plan = dict(job.partition or {})
        train_uri = s.get(File, job.training_file_id).storage_uri
        base_source = _base_model_source(s, job)
        max_length = job.hyperparameters.get("max_length", 512)

    written: list[tuple[str, dict]] = []
    base = _materialize(base_source) if plan.get("strategy") in ("easy_to_hard", "hard_to_easy") else None
    if needs_chunks:
        try:
            written, plan = _write_chunks(job_id, _local(train_uri), plan, base, max_length, job.seed)
        except (PartitionError, ValueError) as e:
            return _fail_job(job_id, None, "partition_failed", str(e))

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
        if job.status == JobStatus.QUEUED:
            transition(job, JobStatus.RUNNING)
        first = next((st for st in steps if st.status not in STEP_TERMINAL), None)
        if first is not None and first.status == StepStatus.PENDING:
            transition(first, StepStatus.QUEUED)
        desc = f", partition {plan['strategy']}" if plan.get("strategy") else ""
        order = f" (order: {' -> '.join(plan['source_order'])})" if plan.get("source_order") else ""
        add_event(s, job_id, f"Job started: {job.n_steps} step(s){desc}{order}.",
                  data={"partition": plan} if plan else None)
    return Outcome.CONTINUE


def _write_chunks(job_id: str, train_path: Path, plan: dict, base: Path | None, max_length: int, seed: int):
    """Partition the training file into T chunks in storage. Returns [(uri, stats)], plan."""
    import subprocess

    source_field = plan.get("source_field") or "source"
    pairs = load_pairs(train_path, source_field=source_field)
    scores = None
    if base is not None:
        done = subprocess.run(engine_command("score-sources", "--model", str(base), "--file", str(train_path),
                                             "--max-length", str(max_length), "--source-field", source_field),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"scoring the sources failed: {done.stderr.strip().splitlines()[-1:]}")
        scores = json.loads(done.stdout.strip().splitlines()[-1])
        plan = {**plan, "source_scores": scores, "source_order": source_order(scores, plan["strategy"])}
    chunks = partition(pairs, plan["strategy"], plan["n_steps"], seed=seed, sizes=plan.get("sizes"),
                       source_scores=scores)
    out = []
    for k, idx in enumerate(chunks, start=1):
        rows = [pairs[i] for i in idx]
        body = (json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
        stored = db.storage().save_stream(f"chunks/{job_id}/step-{k}.jsonl", body)
        sources = Counter(r.get("source") or "(none)" for r in rows)
        out.append((stored.uri, {"rows": len(rows), "sources": dict(sorted(sources.items())),
                                 "sha256": stored.sha256, "bytes": stored.bytes}))
    return out, plan


# ----------------------------------------------------------------------------------------------
# run_step


def run_step(job_id: str, index: int) -> Outcome:
    """Claim step `index`, train it in a child process, record its checkpoint."""
    settings = get_settings()
    me = worker_name()
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
        attempt = step.attempt
        job.current_step = index
        job.updated_at = now
        base_source = _base_model_source(s, job)
        policy_init = _local(s.get(Checkpoint, reference_id).uri) if previous is not None else None
        if step.chunk_uri:
            train_file = _local(step.chunk_uri)
        else:
            train_file = _local(s.get(File, step.training_file_id).storage_uri)
        eval_file = _local(s.get(File, job.validation_file_id).storage_uri) if job.validation_file_id else None
        hyperparameters = dict(step.hyperparameters)
        source_field = (job.partition or {}).get("source_field") or "source"
        owner, job_model = job.owner, job.model
        add_event(s, job_id, f"Step {index}/{job.n_steps} started (attempt {attempt}) on {me}; reference and "
                  f"initial policy: {reference_id or job.model}.", step_index=index,
                  data={"reference_checkpoint": reference_id, "attempt": attempt, "worker": me})

    base = _materialize(base_source)
    policy_init = policy_init or base
    # A checkpoint handed over through storage is checked against its manifest before it is
    # trained on: a truncated copy or a flipped byte must fail loudly, not train silently.
    if read_manifest(policy_init) is not None:
        problems = verify_checkpoint(policy_init)
        if problems:
            return _fail_job(job_id, index, "corrupt_checkpoint",
                             f"Step {index} failed: its initial checkpoint {reference_id or job_model} is corrupt "
                             f"({'; '.join(problems[:3])})", attempt=attempt)
    work = step_work_dir(job_id, index)
    attempt_dir = work / f"attempt-{attempt}"
    out_dir = attempt_dir / "output"
    shutil.rmtree(attempt_dir, ignore_errors=True)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    spec = {"index": index, "policy_init": str(policy_init), "train_file": str(train_file),
            "output_dir": str(out_dir), "work_dir": str(work / "trainer"), "hyperparameters": hyperparameters,
            "eval_file": str(eval_file) if eval_file else None, "eval_reference": str(base) if eval_file else None,
            "device": os.environ.get("SDPO_DEVICE", "auto"), "source_field": source_field,
            "save_steps": int(os.environ.get("SDPO_SAVE_STEPS", "0"))}
    spec_path = attempt_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    def relay(events: list[dict]) -> None:
        with db.session() as s:
            for e in events:
                _record_engine_event(s, job_id, index, e)

    def heartbeat() -> None:
        with db.session() as s:
            s.execute(update(JobStep).where(JobStep.id == step.id, JobStep.status == StepStatus.RUNNING.value,
                                            JobStep.attempt == attempt).values(heartbeat_at=utcnow()))

    def control() -> str:
        with db.session() as s:
            job_status = s.scalar(select(Job.status).where(Job.id == job_id))
            row = s.execute(select(JobStep.status, JobStep.attempt).where(JobStep.id == step.id)).one()
        if job_status in (JobStatus.CANCELLED, JobStatus.FAILED) or row.status == StepStatus.CANCELLED:
            return CANCEL
        if row.status != StepStatus.RUNNING or row.attempt != attempt:
            return CANCEL  # the reaper gave this step to another attempt: this one must stop
        if job_status == JobStatus.PAUSING:
            return PAUSE
        return GO

    outcome = supervise(engine_command("step", str(spec_path)), log_path=attempt_dir / "engine.log",
                        relay=relay, control=control, heartbeat=heartbeat,
                        heartbeat_seconds=settings.step_heartbeat_seconds,
                        poll_seconds=min(1.0, settings.step_heartbeat_seconds))

    if outcome.action == CANCEL:
        with db.session() as s:
            add_event(s, job_id, f"Step {index} stopped: the job was cancelled.", step_index=index)
        shutil.rmtree(attempt_dir / "output", ignore_errors=True)
        return Outcome.STOP
    if outcome.returncode == EXIT_STOPPED:
        return _paused(job_id, step.id, index, attempt, outcome)
    if outcome.returncode != 0 or outcome.result is None:
        err = outcome.error or {}
        code = "invalid_training_data" if outcome.returncode == EXIT_BAD_INPUT else "step_failed"
        message = err.get("message") or f"the training process exited with {outcome.returncode}"
        if not err and outcome.tail:
            message += ": " + outcome.tail[-1][:500]
        return _fail_job(job_id, index, code, f"Step {index} failed: {message}", attempt=attempt)
    return _succeeded(job_id, step.id, index, attempt, owner, out_dir, outcome)


def _record_engine_event(s, job_id: str, index: int, e: dict) -> None:
    kind = e.get("event")
    if kind == "metrics":
        loss = e.get("loss")
        msg = f"Step {index}: global step {e.get('global_step')}/{e.get('max_steps')}"
        if loss is not None:
            msg += f", loss {loss:.4f}"
        add_event(s, job_id, msg, type="metrics", step_index=index,
                  data={k: v for k, v in e.items() if k != "event"})
    elif kind == "info" and e.get("phase") in ("start", "reference_logps", "resume", "eval", "train_end"):
        data = {k: v for k, v in e.items() if k not in ("event",)}
        text = {"start": f"Step {index}: {e.get('pairs')} pairs on {e.get('device')}",
                "reference_logps": f"Step {index}: reference log-probs precomputed, mean gamma_ref "
                                   f"{e.get('mean_gamma_ref', 0):.4f}",
                "resume": f"Step {index}: resuming from {Path(str(e.get('checkpoint'))).name}",
                "eval": f"Step {index}: held-out reward accuracy {e.get('reward_accuracy', 0):.3f}",
                "train_end": f"Step {index}: training finished"}[e["phase"]]
        add_event(s, job_id, text, step_index=index, data=data)
    elif kind == "error":
        add_event(s, job_id, f"Step {index}: {e.get('message')}", level="error", step_index=index,
                  data={k: v for k, v in e.items() if k != "event"})


def _succeeded(job_id, step_id, index, attempt, owner, out_dir: Path, outcome) -> Outcome:
    summary = outcome.result["summary"]
    manifest = read_manifest(out_dir)
    if manifest is None:
        return _fail_job(job_id, index, "step_failed", f"Step {index} wrote no checkpoint manifest", attempt=attempt)
    checkpoint_id = ids.new_id(ids.CHECKPOINT)
    # Into the store first, then the row: a checkpoint row always names complete files. If the
    # transaction below fails, the stored tree is deleted again.
    uri = db.storage().put_tree(out_dir, f"checkpoints/{job_id}/{checkpoint_id}")
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    shutil.rmtree(out_dir, ignore_errors=True)
    metrics = {k: summary.get(k) for k in ("first_loss", "mean_gamma_ref", "last_loss", "reward_accuracy",
                                           "reward_margin", "eval", "pairs", "pairs_used", "train_seconds",
                                           "global_steps")}
    metrics["num_tokens"] = (outcome.last_metrics or {}).get("num_tokens")
    try:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            steps = {st.index: st for st in get_steps(s, job_id, for_update=True)}
            step = steps[index]
            if step.status != StepStatus.RUNNING or step.attempt != attempt:
                db.storage().delete(uri)  # cancelled or handed to another attempt meanwhile
                return Outcome.STOP
            s.add(Checkpoint(id=checkpoint_id, owner=owner, job_id=job_id, step_index=index, uri=uri,
                             sha256=manifest["checkpoint_sha256"], bytes=size, metrics=metrics))
            s.flush()
            step.output_checkpoint_id = checkpoint_id
            step.metrics = metrics
            transition(step, StepStatus.SUCCEEDED)
            nxt = steps.get(index + 1)
            if nxt is not None and nxt.status == StepStatus.PENDING and job.status == JobStatus.RUNNING:
                transition(nxt, StepStatus.QUEUED)
            job.updated_at = utcnow()
            add_event(s, job_id, f"Step {index} succeeded: checkpoint {checkpoint_id}, first loss "
                      f"{_f(metrics['first_loss'])}, last loss {_f(metrics['last_loss'])}, mean gamma_ref "
                      f"{_f(metrics['mean_gamma_ref'])}.", step_index=index,
                      data={"checkpoint": checkpoint_id, **metrics})
    except BaseException:
        db.storage().delete(uri)
        raise
    return Outcome.CONTINUE


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _paused(job_id, step_id, index, attempt, outcome) -> Outcome:
    with db.session() as s:
        job = get_job(s, job_id, for_update=True)
        step = s.get(JobStep, step_id, with_for_update=True)
        if step.status == StepStatus.RUNNING and step.attempt == attempt:
            transition(step, StepStatus.QUEUED)
        if job.status == JobStatus.PAUSING:
            transition(job, JobStatus.PAUSED)
        at = (outcome.stopped or {}).get("global_step")
        add_event(s, job_id, f"Step {index} paused at global step {at}; it resumes from its trainer checkpoint.",
                  step_index=index, data=outcome.stopped)
    return Outcome.STOP


def _fail_job(job_id: str, index: int | None, code: str, message: str, *, attempt: int | None = None) -> Outcome:
    """The job fails with a readable error; its unfinished steps are cancelled (the failed one failed)."""
    with db.session() as s:
        job = get_job(s, job_id, for_update=True)
        if job is None or job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
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


# ----------------------------------------------------------------------------------------------
# finalize_job


def finalize_job(job_id: str) -> Outcome:
    """The job succeeded: register its final checkpoint as a model later jobs can start from."""
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


# ----------------------------------------------------------------------------------------------
# reap


def reap() -> int:
    """Requeue running steps whose heartbeat is stale (their worker died). Returns how many.

    The broker is not the truth: a SIGKILLed worker's message may be gone (no server-less
    transport redelivers) or come back only after the visibility timeout. The step row says what
    was running; a new chain from that step on is sent, and the claim makes any late redelivery
    harmless. Past `max_step_attempts` the job fails instead.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.step_stale_seconds)
    app = make_celery(settings)
    count = 0
    with db.session() as s:
        stale = list(s.scalars(select(JobStep).where(JobStep.status == StepStatus.RUNNING.value,
                                                     JobStep.heartbeat_at < cutoff)))
        stale_jobs = sorted({st.job_id for st in stale})
    for job_id in stale_jobs:
        with db.session() as s:
            job = get_job(s, job_id, for_update=True)
            steps = get_steps(s, job_id, for_update=True)
            for st in steps:
                if st.status != StepStatus.RUNNING or st.heartbeat_at is None or st.heartbeat_at >= cutoff:
                    continue
                if st.attempt >= settings.max_step_attempts:
                    message = (f"Step {st.index} failed: its worker stopped answering {st.attempt} times "
                               f"(max_step_attempts={settings.max_step_attempts}).")
                    st.error = {"code": "retries_exhausted", "message": message}
                    transition(st, StepStatus.FAILED)
                    for later in steps:
                        if later.status not in STEP_TERMINAL:
                            transition(later, StepStatus.CANCELLED)
                    if job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                        job.error = {"code": "retries_exhausted", "message": message, "param": None}
                        transition(job, JobStatus.FAILED)
                    add_event(s, job_id, message, level="error", step_index=st.index)
                    continue
                transition(st, StepStatus.QUEUED)
                add_event(s, job_id, f"Step {st.index}: worker {st.worker} stopped answering; requeued for "
                          f"attempt {st.attempt + 1}.", level="warn", step_index=st.index)
                remaining = [x.index for x in steps if x.index >= st.index]
                enqueue_after_commit(s, job_chain(app, job_id, remaining))
                count += 1
    return count
