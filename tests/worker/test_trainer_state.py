"""A stopped step's trainer checkpoint through the store (worker/trainer_state.py), against the local
folder store and the S3 store (a real moto server over HTTP, `moto_server` in tests/conftest.py):
put on one "host" (a work folder), fetched by another (a work folder of its own), removed when the
step or the job is over; a stored state that cannot be used is an event, never an error. And the
reaper's end of a step (worker/flows.py) on real Postgres: a step whose retries it spends fails its
job, whose stored trainer state goes as when its worker had failed it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from core.clock import utcnow
from core.jobs import get_steps
from core.models import Job
from core.queue import make_celery
from core.storage import LocalStorage, Storage, StorageUnavailable
from sdpo_engine.protocol import TRAINER_CHECKPOINT_SEAL
from tests.api.factories import file_row, job_row
from worker import flows, trainer_state
from worker.workdir import TRAINER_STATE

JOB = "ftjob-abc"


@dataclass
class Backend:
    name: str
    store: Storage
    keys: Callable[[], list[str]]  # every stored object, sorted
    raw_put: Callable[[str, bytes], None]  # overwrite one stored file by key, behind the store's back


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    if request.param == "local":
        root = tmp_path / "store"
        store = LocalStorage(root)

        def local_keys() -> list[str]:
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and not p.relative_to(root).as_posix().startswith(".tmp"))

        return Backend("local", store, local_keys, lambda key, data: (root / key).write_bytes(data))
    server = request.getfixturevalue("moto_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    bucket = server.new_bucket()
    from core.s3_storage import S3Storage

    store = S3Storage(f"s3://{bucket}/sdpo", tmp_path / "cache", max_attempts=2)
    raw = server.client()

    def s3_keys() -> list[str]:
        return sorted(o["Key"].removeprefix("sdpo/") for o in raw.list_objects_v2(Bucket=bucket).get("Contents", []))

    return Backend("s3", store, s3_keys, lambda key, data: raw.put_object(Bucket=bucket, Key=f"sdpo/{key}", Body=data))


def _checkpoint(work: Path, attempt: int, global_step: int, *, complete: bool = True) -> Path:
    """A trainer checkpoint as transformers lays it out, with the engine's seal (`complete`: both written)."""
    folder = work / f"attempt-{attempt}" / "trainer" / f"checkpoint-{global_step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(bytes(range(256)) * (40 + global_step))
    (folder / "model.safetensors").write_bytes(b"w" * 5000)
    (folder / "rng_state.pth").write_bytes(b"r" * 10)
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"global_step": global_step, "log_history": []}))
        (folder / TRAINER_CHECKPOINT_SEAL).write_text(json.dumps({"world_size": 1, "strategy": None}))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _notes() -> tuple[list[tuple[str, str, dict]], trainer_state.Note]:
    seen: list[tuple[str, str, dict]] = []

    def note(message: str, *, level: str = "info", data: dict) -> None:
        seen.append((level, message, data))

    return seen, note


def test_a_state_put_on_one_host_is_fetched_on_another_then_removed_with_the_step(backend, tmp_path):
    host_a, host_b = tmp_path / "a" / "step-1", tmp_path / "b" / "step-1"
    _checkpoint(host_a, 1, 4)
    saved = _checkpoint(host_a, 1, 8)
    _checkpoint(host_a, 1, 12, complete=False)  # cut off by the kill: never uploaded
    record = trainer_state.put(backend.store, JOB, 1, 1, host_a)
    assert record is not None and (record.global_step, record.checkpoint, record.attempt) == (8, "checkpoint-8", 1)
    stored = backend.keys()
    assert f"jobs/{JOB}/steps/1/trainer-state.json" in stored
    assert sum(k.endswith("/optimizer.pt") for k in stored) == 1

    seen, note = _notes()
    got = trainer_state.resume_point(backend.store, JOB, 1, 2, host_b, note=note)
    assert got == host_b / "attempt-2" / "trainer" / "checkpoint-8"
    assert _files(got) == _files(saved)
    assert [(level, data) for level, _, data in seen] == [
        ("info", {"trainer_state": "store", "global_step": 8, "attempt": 1})]
    assert [p.name for p in got.parent.iterdir()] == ["checkpoint-8"]  # no partial download left
    if backend.name == "local":  # on the store's own disk: hard links, not a copy of the optimizer state
        [stored_opt] = (backend.store.root / "jobs").rglob("optimizer.pt")
        assert stored_opt.stat().st_ino == (saved / "optimizer.pt").stat().st_ino
        assert sorted(p.name for p in saved.parent.iterdir()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]

    # The step succeeded on host B: its stored state goes, the job's other steps' stays.
    _checkpoint(tmp_path / "a" / "step-2", 1, 3)
    trainer_state.put(backend.store, JOB, 2, 1, tmp_path / "a" / "step-2")
    trainer_state.discard_step(backend.store, JOB, 1)
    assert backend.keys() and all(k.startswith(f"jobs/{JOB}/steps/2/") for k in backend.keys())
    trainer_state.discard_job(backend.store, JOB)
    assert backend.keys() == []
    trainer_state.discard_job(backend.store, JOB)  # nothing left: not an error


def test_a_newer_stop_replaces_the_stored_state_and_the_newest_copy_wins(backend, tmp_path):
    host_a, host_b = tmp_path / "a" / "step-1", tmp_path / "b" / "step-1"
    _checkpoint(host_a, 1, 4)
    trainer_state.put(backend.store, JOB, 1, 1, host_a)
    # Host B resumes from global step 4, trains to 10 and stops: the store now holds 10 only.
    seen, note = _notes()
    assert trainer_state.resume_point(backend.store, JOB, 1, 2, host_b, note=note).name == "checkpoint-4"
    _checkpoint(host_b, 2, 10)
    assert trainer_state.put(backend.store, JOB, 1, 2, host_b).global_step == 10
    assert sum(k.endswith("/optimizer.pt") for k in backend.keys()) == 1
    # Back on host A, whose own folder still holds step 4: the store's 10 is newer and wins.
    got = trainer_state.resume_point(backend.store, JOB, 1, 3, host_a, note=note)
    assert got == host_a / "attempt-3" / "trainer" / "checkpoint-10"
    assert [p.name for p in got.parent.iterdir()] == ["checkpoint-10"]  # the older local one went
    # Stopped again before its next save: the stored state stays as it is (no upload).
    before = backend.keys()
    assert trainer_state.put(backend.store, JOB, 1, 3, host_a).attempt == 2
    assert backend.keys() == before
    # A host whose own copy is as new as the stored one reads nothing from the store.
    fetched, record, why = trainer_state.fetch(backend.store, JOB, 1, tmp_path / "c", newer_than=10)
    assert (fetched, record, why) == (None, None, None) and not (tmp_path / "c").exists()


def test_nothing_stored_or_no_complete_checkpoint_is_a_fresh_start_without_an_event(backend, tmp_path):
    work = tmp_path / "step-1"
    _checkpoint(work, 1, 6, complete=False)
    assert trainer_state.put(backend.store, JOB, 1, 1, work) is None
    assert backend.keys() == []
    seen, note = _notes()
    assert trainer_state.resume_point(backend.store, JOB, 1, 2, tmp_path / "other", note=note) is None
    assert seen == []


@pytest.mark.parametrize("damage", ["tree_gone", "record_garbled", "trainer_state_wrong"])
def test_a_stored_state_that_cannot_be_used_is_an_event_and_a_fresh_start(backend, tmp_path, damage):
    host_a, host_b = tmp_path / "a" / "step-1", tmp_path / "b" / "step-1"
    _checkpoint(host_a, 1, 8)
    record = trainer_state.put(backend.store, JOB, 1, 1, host_a)
    if damage == "tree_gone":
        backend.store.delete(record.uri)
    elif damage == "record_garbled":
        backend.raw_put(f"jobs/{JOB}/steps/1/trainer-state.json", b'{"uri": ')
    else:  # a trainer_state.json of another global step: a half-mixed state, never used
        key = [k for k in backend.keys() if k.endswith(f"checkpoint-8/{TRAINER_STATE}")][0]
        backend.raw_put(key, json.dumps({"global_step": 2}).encode())
    seen, note = _notes()
    assert trainer_state.resume_point(backend.store, JOB, 1, 2, host_b, note=note) is None
    [(level, message, data)] = seen
    assert level == "warn" and data["trainer_state"] == "unusable" and message.endswith("it starts afresh.")
    expected = {"tree_gone": "missing", "record_garbled": "record is unreadable",
                "trainer_state_wrong": "corrupt" if backend.name == "s3" else "global step 2"}[damage]
    assert expected in data["reason"], data
    assert list((host_b / "attempt-2" / "trainer").glob("*")) == []  # no half state left to resume from


@pytest.mark.parametrize("backend", ["s3"], indirect=True)  # the local store's trees are whole by a rename
def test_a_flipped_byte_in_the_bucket_is_caught_by_the_sha256_check(backend, tmp_path):
    _checkpoint(tmp_path / "a", 1, 8)
    trainer_state.put(backend.store, JOB, 1, 1, tmp_path / "a")
    key = [k for k in backend.keys() if k.endswith("/optimizer.pt")][0]
    backend.raw_put(key, b"\0" * 256 * 48)  # same size, other bytes
    fetched, record, why = trainer_state.fetch(backend.store, JOB, 1, tmp_path / "b")
    assert fetched is None and record.global_step == 8 and "corrupt" in why and "optimizer.pt" in why


def test_an_unreachable_store_is_an_event_not_an_error(tmp_path, monkeypatch):
    from core.s3_storage import S3Storage
    from tests.s3server import CREDENTIALS, free_port

    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}.items():
        monkeypatch.setenv(name, value)
    store = S3Storage("s3://gone/sdpo", tmp_path / "cache", max_attempts=1)
    work = tmp_path / "step-1"
    _checkpoint(work, 1, 4)
    seen, note = _notes()
    trainer_state.put_or_note(store, JOB, 1, 1, work, note=note)
    # Its own copy still resumes the step on this host; the store's absence is said, not raised.
    assert trainer_state.resume_point(store, JOB, 1, 2, work, note=note) == work / "attempt-2/trainer/checkpoint-4"
    assert [(lvl, d["trainer_state"]) for lvl, _, d in seen] == [("warn", "not_stored"), ("warn", "unusable")]
    assert all("could not be reached" in d["reason"] for _, _, d in seen)
    assert "resumes from this worker's global step 4" in seen[1][1]
    trainer_state.discard_job(store, JOB)  # never raises


# The reaper (worker/flows.py: requeue_stale_steps) against real Postgres and Redis, with the worker's
# own store (the local folder store of `settings`).


@pytest.fixture
def worker_store(monkeypatch, settings, clean_state):
    """worker.db's sessions and store on the test database and store (the worker reads its settings
    from the environment)."""
    import worker.db

    monkeypatch.setattr(worker.db, "get_settings", lambda: settings)
    worker.db.reset()
    worker.db.storage.cache_clear()
    yield worker.db.storage()
    worker.db.reset()
    worker.db.storage.cache_clear()


def test_a_step_the_reaper_fails_after_its_retries_loses_its_stored_state_and_a_requeued_one_keeps_it(
        db, settings, clean_state, base_model, worker_store, tmp_path):
    stale = utcnow() - timedelta(seconds=settings.step_stale_seconds + 60)
    jobs = {}
    for name, failed_before in (("spent", settings.max_step_attempts - 1), ("requeued", 0)):
        job = job_row(db, "alice", file_row(db, "alice").id, status="running", n_steps=2)
        step = get_steps(db, job.id)[0]
        step.status, step.attempt, step.failed_attempts = "running", failed_before + 1, failed_before
        step.worker, step.heartbeat_at = "host:1", stale  # its worker died (a SIGKILL, a lost host)
        db.commit()
        _checkpoint(tmp_path / name, failed_before + 1, 6)
        assert trainer_state.put(worker_store, job.id, 1, failed_before + 1, tmp_path / name) is not None
        jobs[name] = job.id

    assert flows.requeue_stale_steps(settings, make_celery(settings)) == 1
    db.expire_all()
    spent, requeued = db.get(Job, jobs["spent"]), db.get(Job, jobs["requeued"])
    assert (spent.status, spent.error["code"]) == ("failed", "retries_exhausted")
    assert [st.status for st in get_steps(db, spent.id)] == ["failed", "cancelled"]
    assert requeued.status == "running" and get_steps(db, requeued.id)[0].status == "queued"
    # No attempt resumes the failed job's step: its stored state is gone. The requeued step's next
    # attempt, on any host, resumes from its own.
    assert not (worker_store.root / "jobs" / spent.id).exists()
    assert trainer_state.read_record(worker_store, requeued.id, 1).global_step == 6
    fetched, _, why = trainer_state.fetch(worker_store, requeued.id, 1, tmp_path / "next")
    assert why is None and fetched is not None and fetched.name == "checkpoint-6"


def test_a_paused_job_cancelled_through_the_api_loses_its_stored_state_by_the_cancels_task(
        db, settings, clean_state, base_model, worker_store, tmp_path):
    """No worker runs a step of a paused job, so none sees its cancel: the cancel's `sdpo.job_ended`
    task (flows.end_job) is what discards the trainer state the pause stored."""
    from core.celery_config import JOB_ENDED
    from core.jobs import lifecycle

    job = job_row(db, "alice", file_row(db, "alice").id, status="paused", n_steps=2)
    step = get_steps(db, job.id)[0]
    step.status, step.attempt = "pending", 1  # paused after attempt 1 stored its state
    db.commit()
    _checkpoint(tmp_path / "paused", 1, 4)
    assert trainer_state.put(worker_store, job.id, 1, 1, tmp_path / "paused") is not None

    flows.end_job(job.id, settings=settings)  # a message for a job that has not ended: nothing goes
    assert trainer_state.read_record(worker_store, job.id, 1).global_step == 4
    app = make_celery(settings)
    lifecycle.cancel_job(db, db.get(Job, job.id), app)
    db.commit()
    assert app.conf.task_routes[JOB_ENDED] == {"queue": settings.light_queue}
    flows.end_job(job.id, settings=settings)  # what the light worker runs for that message
    flows.end_job(job.id, settings=settings)  # a redelivery: nothing left, no error
    assert not (worker_store.root / "jobs" / job.id).exists()
    db.expire_all()
    assert db.get(Job, job.id).end_transition_at is not None  # the reaper has nothing left to do for it
    assert flows.end_overdue_jobs(settings) == 0


def test_the_reaper_ends_a_job_whose_job_ended_message_was_lost_and_only_once(
        db, settings, clean_state, base_model, worker_store, tmp_path, monkeypatch):
    """A cancel whose sdpo.job_ended message the broker lost (or a worker dead between a job's end and
    its end transition): the job is ended but its stored trainer state stays and its tracked runs stay
    open. The reaper does the transition once the job has been quiet for step_stale_seconds, records
    it, and never again; while the store cannot be reached the transition stays due."""
    from sqlalchemy import update

    old = utcnow() - timedelta(seconds=settings.step_stale_seconds + 60)
    jobs = {}
    for name, status, updated in (("lost", "cancelled", old), ("store_down", "failed", old),
                                  ("just_ended", "cancelled", utcnow()), ("paused", "paused", old)):
        job = job_row(db, "alice", file_row(db, "alice").id, status=status, n_steps=2)
        db.execute(update(Job).where(Job.id == job.id).values(updated_at=updated))
        db.commit()
        _checkpoint(tmp_path / name, 1, 4)
        assert trainer_state.put(worker_store, job.id, 1, 1, tmp_path / name) is not None
        jobs[name] = job.id

    real_delete = type(worker_store).delete

    def delete(store, uri):
        if jobs["store_down"] in uri:
            raise StorageUnavailable("the store could not be reached")
        return real_delete(store, uri)

    monkeypatch.setattr(type(worker_store), "delete", delete)
    assert flows.reap(settings=settings, app=make_celery(settings)) == 0  # nothing requeued or re-sent
    db.expire_all()
    ended = {name: db.get(Job, job_id).end_transition_at for name, job_id in jobs.items()}
    assert ended["lost"] is not None and ended["store_down"] is None
    assert ended["just_ended"] is None and ended["paused"] is None  # not due yet; not ended
    assert not (worker_store.root / "jobs" / jobs["lost"]).exists()
    for name in ("store_down", "just_ended", "paused"):
        assert trainer_state.read_record(worker_store, jobs[name], 1).global_step == 4, name

    monkeypatch.setattr(type(worker_store), "delete", real_delete)  # the store is back
    assert flows.end_overdue_jobs(settings) == 1  # store_down only: `lost` is done, never redone
    db.expire_all()
    assert db.get(Job, jobs["store_down"]).end_transition_at is not None
    assert not (worker_store.root / "jobs" / jobs["store_down"]).exists()
    assert flows.end_overdue_jobs(settings) == 0
