"""Rows inserted directly, for states the API cannot reach yet (a worker's checkpoint, a file
that failed validation, a running job)."""

from __future__ import annotations

from pathlib import Path

from core import ids
from core.clock import utcnow
from core.models import Checkpoint, File, Job, JobStep, RegisteredModel
from core.storage import LocalStorage


def file_row(db, owner: str, *, status: str = "processed", rows: int = 10, details: str | None = None) -> File:
    row = File(id=ids.new_id(ids.FILE), owner=owner, filename="x.jsonl", bytes=1, sha256="0" * 64,
               purpose="fine-tune", format="standard", rows=rows, status=status, status_details=details,
               report={"valid": status == "processed", "stats": {"rows": rows}},
               storage_uri=f"local://files/{ids.new_id(ids.FILE)}")
    db.add(row)
    db.commit()
    return row


def job_row(db, owner: str, file_id: str, *, model_id: str = "tiny-base", status: str = "succeeded",
            n_steps: int = 1) -> Job:
    job = Job(id=ids.new_id(ids.JOB), owner=owner, model=model_id, model_id=model_id, training_file_id=file_id,
              method={"type": "dpo"}, hyperparameters={}, n_steps=n_steps, status=status, seed=1)
    db.add(job)
    for k in range(1, n_steps + 1):
        db.add(JobStep(id=ids.new_id(ids.STEP), job_id=job.id, index=k, status="pending", hyperparameters={}))
    db.commit()
    return job


def checkpoint_row(db, job: Job, step_index: int = 1, *, storage: LocalStorage | None = None,
                   tree: Path | None = None, metrics: dict | None = None) -> Checkpoint:
    """A checkpoint of `job`; with `storage` and `tree`, the directory is stored for real."""
    ckpt_id = ids.new_id(ids.CHECKPOINT)
    uri = f"local://checkpoints/{job.id}/step-{step_index}"
    if storage is not None and tree is not None:
        uri = storage.put_tree(tree, f"checkpoints/{job.id}/step-{step_index}")
    row = Checkpoint(id=ckpt_id, owner=job.owner, job_id=job.id, step_index=step_index, uri=uri,
                     sha256="1" * 64, bytes=123, metrics=metrics or {"last_loss": 0.5, "first_loss": 0.69})
    db.add(row)
    db.commit()
    return row


def fine_tuned_model_row(db, job: Job, checkpoint: Checkpoint) -> RegisteredModel:
    from core.jobs import fine_tuned_model_name

    row = RegisteredModel(id=fine_tuned_model_name(job), owner=job.owner, source="checkpoint", uri=checkpoint.uri,
                          default_hyperparameters={"learning_rate": 1e-3}, job_id=job.id,
                          checkpoint_id=checkpoint.id, created_at=utcnow())
    db.add(row)
    db.commit()
    return row
