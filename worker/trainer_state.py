"""A stopped step's trainer checkpoint in the store, so that its next attempt resumes on any host.

The engine's trainer checkpoint (weights, optimizer and scheduler state, RNG states,
`trainer_state.json`) lives in the attempt's work folder on the worker's own disk. With an S3
store (`SDPO_STORAGE_URL`) each host's folder is its own, so a step paused on host A and resumed
on host B would start afresh. When an attempt ends with a resumable checkpoint (a pause or a
SIGTERM: engine exit 75; a training process that crashed after a save), the worker puts the
newest complete one into the store:

    jobs/<job>/steps/<i>/trainer-state/<token>-checkpoint-<n>/   the folder (Storage.put_tree)
    jobs/<job>/steps/<i>/trainer-state.json                      which folder, its global step

The folder is a stored tree, visible only complete (a rename, or on S3 its index written after
its files); the small record is written after it, so it never names a partial upload. The next
attempt, on any host, reads the record and fetches the folder when it is newer than what its
own work folder holds. Both go when the step succeeds or the job ends.

Only checkpoints an attempt ends with are uploaded, not every `step_save_steps` save: a save
holds the optimizer moments besides the weights (with Adam about three times the weights in
fp32), and uploading one every few minutes would compete with training for the host's network
and disk while a save of a host lost without warning is still lost. A worker that is stopped
(SIGTERM) passes the SIGTERM to its training process, which saves, and that save is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.storage import CorruptObject, LocalStorage, Storage, StorageUnavailable
from sdpo_engine.protocol import TRAINER_CHECKPOINT_SEAL
from worker.workdir import TRAINER_STATE, hand_over_trainer_state, newest_trainer_checkpoint

log = logging.getLogger(__name__)


Note = Callable[..., None]  # note(message, *, level="info", data={...}): one event of the step


@dataclass(frozen=True)
class StoredState:
    """The record of a stored trainer checkpoint: the tree's URI, its folder name
    (`checkpoint-<n>`), its global step `n` and the attempt that wrote it."""

    uri: str
    checkpoint: str
    global_step: int
    attempt: int


def job_key(job_id: str) -> str:
    """Everything the worker keeps in the store for a job's steps (removed with one delete)."""
    return f"jobs/{job_id}"


def record_key(job_id: str, index: int) -> str:
    return f"{job_key(job_id)}/steps/{index}/trainer-state.json"


def read_record(store: Storage, job_id: str, index: int) -> StoredState | None:
    """The stored record of step `index`'s trainer checkpoint; None when there is none. Raises
    ValueError (an unreadable record), `StorageUnavailable` (the store away after retries)."""
    uri = store.uri_for(record_key(job_id, index))
    try:
        with store.open(uri) as f:
            body = json.loads(f.read())
        return StoredState(uri=str(body["uri"]), checkpoint=str(body["checkpoint"]),
                           global_step=int(body["global_step"]), attempt=int(body["attempt"]))
    except FileNotFoundError:
        return None
    except StorageUnavailable:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its record is unreadable ({type(exc).__name__})") from exc


def put(store: Storage, job_id: str, index: int, attempt: int, work: Path) -> StoredState | None:
    """Put the newest complete trainer checkpoint under `work` (the step's work folder) into the
    store, then its record; the previously stored one goes. Returns the record, or None when there
    is no complete checkpoint or the store already holds one as new. Raises OSError
    (`StorageUnavailable` among them) when the upload fails: nothing new is then visible."""
    found = newest_trainer_checkpoint(work)
    if found is None:
        return None
    global_step, folder = found
    try:
        previous = read_record(store, job_id, index)
    except ValueError:
        previous = None  # overwritten below
    if previous is not None and previous.global_step >= global_step:
        # This attempt resumed from the stored state and stopped before it got further.
        return previous
    base = f"{job_key(job_id)}/steps/{index}/trainer-state"
    uri = _put_tree(store, folder, f"{base}/{uuid.uuid4().hex[:12]}-{folder.name}")
    record = StoredState(uri=uri, checkpoint=folder.name, global_step=global_step, attempt=attempt)
    try:
        # The record last: a reader sees the old state or the new one, never a half upload.
        store.save_stream(record_key(job_id, index), [json.dumps(record.__dict__).encode()])
    except BaseException:
        _delete_quietly(store, uri)
        raise
    if previous is not None and previous.uri != uri:
        _delete_quietly(store, previous.uri)
    return record


def _put_tree(store: Storage, folder: Path, key: str) -> str:
    """`store.put_tree`; into a local folder store (the work folders are under its root) as hard
    links renamed into place: no second copy of the optimizer state on the same disk."""
    if not isinstance(store, LocalStorage):
        return store.put_tree(folder, key)
    linked = folder.parent / f".store-{uuid.uuid4().hex}"
    try:
        shutil.copytree(folder, linked, copy_function=os.link)
    except OSError:  # a file system without hard links
        shutil.rmtree(linked, ignore_errors=True)
        return store.put_tree(folder, key)
    try:
        return store.move_tree(linked, key)
    finally:
        shutil.rmtree(linked, ignore_errors=True)


def fetch(store: Storage, job_id: str, index: int, trainer_dir: Path,
          newer_than: int = -1) -> tuple[Path | None, StoredState | None, str | None]:
    """Copy step `index`'s stored trainer checkpoint into `trainer_dir` (the attempt's trainer
    folder) when it is newer than global step `newer_than`.

    Returns (the local `checkpoint-<n>` folder, its record, None) when fetched; (None, None, None)
    when the store holds none (or none newer); (None, the record or None, why) when the stored one
    cannot be used (missing, corrupt, incomplete, unreadable record, store away): nothing is left
    in `trainer_dir` then, the caller starts without it. Never raises for the store's sake."""
    try:
        record = read_record(store, job_id, index)
    except (OSError, ValueError) as exc:
        return None, None, _why(exc)
    if record is None or record.global_step <= newer_than:
        return None, None, None
    dest = trainer_dir / record.checkpoint
    partial = trainer_dir / f".fetch-{uuid.uuid4().hex}"
    try:
        trainer_dir.mkdir(parents=True, exist_ok=True)
        store.get_tree(record.uri, partial)
        for name in (TRAINER_STATE, TRAINER_CHECKPOINT_SEAL):
            if not (partial / name).is_file():
                raise CorruptObject(f"{name} is missing")
        state = json.loads((partial / TRAINER_STATE).read_text())
        if state.get("global_step") != record.global_step:
            raise CorruptObject(f"{TRAINER_STATE} says global step {state.get('global_step')}, "
                                f"the record {record.global_step}")
        partial.rename(dest)
    except (OSError, ValueError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        return None, record, _why(exc)
    return dest, record, None


def resume_point(store: Storage, job_id: str, index: int, attempt: int, work: Path, *, note: Note) -> Path | None:
    """The trainer checkpoint attempt `attempt` of step `index` resumes from: the newest one in this
    host's work folder `work` (`workdir.hand_over_trainer_state`), unless the store holds a newer
    one (the step paused or stopped on another host), which is fetched into the attempt's trainer
    folder. Either event goes through `note`: the fetch, or a stored state that cannot be used
    (the attempt then resumes from its local one or starts afresh). Never raises for the store."""
    local = hand_over_trainer_state(work, attempt)
    local_step = int(local.name.rsplit("-", 1)[-1]) if local is not None else -1
    fetched, record, why = fetch(store, job_id, index, work / f"attempt-{attempt}" / "trainer", newer_than=local_step)
    if fetched is not None and record is not None:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        note(f"Step {index}: trainer state at global step {record.global_step} fetched from the store "
             f"(saved by attempt {record.attempt}).",
             data={"trainer_state": "store", "global_step": record.global_step, "attempt": record.attempt})
        return fetched
    if why is not None:
        at = f" at global step {record.global_step}" if record is not None else ""
        then = f"it resumes from this worker's global step {local_step}" if local is not None else "it starts afresh"
        note(f"Step {index}: its stored trainer state{at} cannot be used ({why}); {then}.", level="warn",
             data={"trainer_state": "unusable", "reason": why})
    return local


def put_or_note(store: Storage, job_id: str, index: int, attempt: int, work: Path, *, note: Note) -> None:
    """`put`, with a failed upload an event (`note`): the step then resumes from its trainer
    state only on this host."""
    try:
        put(store, job_id, index, attempt, work)
    except OSError as exc:
        log.warning("step %s of %s: storing the trainer state failed", index, job_id, exc_info=True)
        note(f"Step {index}: its trainer state could not be put into the store ({_why(exc)}); only this "
             "worker can resume from it.", level="warn", data={"trainer_state": "not_stored", "reason": _why(exc)})


def discard_step(store: Storage, job_id: str, index: int) -> None:
    """Remove step `index`'s stored trainer state (its record first). Never raises: a leftover
    costs space only, and goes with the job."""
    try:
        record = read_record(store, job_id, index)
    except (OSError, ValueError):
        record = None
    _delete_quietly(store, store.uri_for(record_key(job_id, index)))
    if record is not None:
        _delete_quietly(store, record.uri)


def discard_job(store: Storage, job_id: str) -> bool:
    """Remove the stored trainer state of every step of a job that has ended. Never raises: False
    when the store could not be reached (or refused), so the caller can try again later."""
    return _delete_quietly(store, store.uri_for(job_key(job_id)))


def _delete_quietly(store: Storage, uri: str) -> bool:
    try:
        store.delete(uri)
    except OSError:
        log.warning("could not remove %s from the store", uri, exc_info=True)
        return False
    return True


def _why(exc: BaseException) -> str:
    """Why a stored trainer state could not be written or used, without the store's paths."""
    if isinstance(exc, StorageUnavailable):
        return "the store could not be reached after retries"
    if isinstance(exc, CorruptObject):
        return f"it is corrupt ({str(exc)[:200]})"
    if isinstance(exc, FileNotFoundError):
        return "it is missing from the store"
    if isinstance(exc, OSError) and exc.errno:  # the local store: a full disk, a folder not writable
        return os.strerror(exc.errno)
    if isinstance(exc, ValueError):
        return str(exc)[:200] if "record" in str(exc) else f"it is incomplete ({type(exc).__name__})"
    return f"it could not be read ({type(exc).__name__})"
