"""Fast fault tests of the pieces the process-level tests rely on: the supervisor keeps training
and keeps every event while its database callbacks fail; database work is retried only for
transient errors; a checkpoint copy that fails half-way leaves nothing in the store."""

from __future__ import annotations

import errno
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from core.storage import LocalStorage
from worker import db
from worker.flows import describe_os_error
from worker.supervisor import CANCEL, GO, supervise

CHILD = textwrap.dedent("""
    import json, sys, time
    for i in range(1, 31):
        print(json.dumps({"event": "metrics", "global_step": i}), flush=True)
        time.sleep(0.05)
    print(json.dumps({"event": "result", "summary": {}}), flush=True)
""")


def _child(tmp_path: Path) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script)]


def test_supervisor_keeps_training_and_every_event_while_the_database_is_away(tmp_path):
    relayed: list[int] = []
    calls = {"relay": 0, "beat": 0, "control": 0}

    def relay(events):
        calls["relay"] += 1
        if calls["relay"] <= 4:  # the database is down for the first tries
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        relayed.extend(e["global_step"] for e in events if e.get("event") == "metrics")

    def heartbeat():
        calls["beat"] += 1
        raise OperationalError("UPDATE", {}, Exception("connection refused"))

    def control():
        calls["control"] += 1
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    outcome = supervise(_child(tmp_path), log_path=tmp_path / "log", relay=relay, control=control,
                        heartbeat=heartbeat, heartbeat_seconds=0.1, poll_seconds=0.1, flush_seconds=30)
    assert outcome.returncode == 0 and outcome.action == GO and outcome.result is not None
    assert relayed == list(range(1, 31)), "each event relayed once, in order, after the failures"
    assert calls["beat"] >= 3 and calls["control"] >= 3


def test_supervisor_flushes_the_last_events_once_the_database_is_back(tmp_path):
    relayed: list[int] = []
    down = {"tries": 0}

    def relay(events):
        down["tries"] += 1
        if down["tries"] < 6:  # down until after the child has exited (1.5 s of events, then 7.5 s of pauses)
            raise OperationalError("INSERT", {}, Exception("the database system is starting up"))
        relayed.extend(e["global_step"] for e in events if e.get("event") == "metrics")

    outcome = supervise(_child(tmp_path), log_path=tmp_path / "log", relay=relay, control=lambda: GO,
                        heartbeat=lambda: None, heartbeat_seconds=5, poll_seconds=0.1, flush_seconds=60)
    assert outcome.returncode == 0
    assert relayed == list(range(1, 31))


def test_supervisor_kills_the_child_if_it_fails_itself(tmp_path):
    pids = []

    def control():
        raise KeyboardInterrupt  # not a database error: the supervisor gives up, and takes the child along

    def relay(_events):
        pass

    import psutil

    with pytest.raises(KeyboardInterrupt):
        supervise(_child(tmp_path), log_path=tmp_path / "log", relay=relay, control=control,
                  heartbeat=lambda: pids.extend(p.pid for p in psutil.Process().children()), heartbeat_seconds=0.01,
                  poll_seconds=0.05)
    assert pids and all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                        for pid in pids)


def test_supervisor_cancel_kills_the_child_at_once(tmp_path):
    outcome = supervise(_child(tmp_path), log_path=tmp_path / "log", relay=lambda e: None,
                        control=lambda: CANCEL, heartbeat=lambda: None, poll_seconds=0.05)
    assert outcome.action == CANCEL and outcome.returncode == -9 and outcome.result is None


def test_retrying_retries_transient_errors_only(monkeypatch):
    sleeps: list[float] = []
    tries = {"n": 0}

    def flaky():
        tries["n"] += 1
        if tries["n"] < 4:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "done"

    assert db.retrying(flaky, what="test", seconds=60, sleep=sleeps.append) == "done"
    assert sleeps == [0.5, 1.0, 2.0]

    def broken():
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        db.retrying(broken, what="test", seconds=60, sleep=sleeps.append)
    assert len(sleeps) == 3, "a refused statement is not retried"

    def down():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        db.retrying(down, what="test", seconds=3, sleep=lambda s: None)


def test_a_checkpoint_copy_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    tree = tmp_path / "ckpt"
    tree.mkdir()
    for name in ("config.json", "model.safetensors", "sdpo_manifest.json"):
        (tree / name).write_bytes(b"x" * 1000)
    store = LocalStorage(tmp_path / "store")
    copied = []
    real_copy = shutil.copy2

    def disk_full(src, dst, **kwargs):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    real_copytree = shutil.copytree
    monkeypatch.setattr(shutil, "copytree", lambda src, dst, **kw: real_copytree(src, dst, copy_function=disk_full))
    with pytest.raises(OSError) as raised:
        store.put_tree(tree, "checkpoints/ftjob-x/ftckpt-y")
    assert describe_os_error(raised.value) == "No space left on device"
    assert not (tmp_path / "store" / "checkpoints" / "ftjob-x" / "ftckpt-y").exists()
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_a_warm_engine_process_takes_the_next_command(tmp_path):
    """warm=True: the first engine command starts cold and leaves a warm process (imports done)
    behind; the next one runs in it, with its own log file, and the same output as a cold run.
    A dead warm process is replaced by a cold start, never a failure."""
    import psutil

    from sdpo_engine.sample_data import make_pairs, write_jsonl
    from worker.supervisor import _Warm, engine_command

    pairs = write_jsonl(make_pairs(3, seed=0), tmp_path / "pairs.jsonl")
    runs = []

    def run(name: str, warm: bool = True):
        relayed: list[dict] = []
        outcome = supervise(engine_command("validate", str(pairs)), log_path=tmp_path / f"{name}.log",
                            relay=relayed.extend, control=lambda: GO, heartbeat=lambda: None, poll_seconds=0.05,
                            warm=warm)
        runs.append((outcome, relayed))
        return outcome, relayed

    try:
        cold, cold_lines = run("first")
        assert cold.returncode == 0 and not cold.warm
        assert _Warm.proc is not None and _Warm.proc.poll() is None
        spare = _Warm.proc.pid
        warm, warm_lines = run("second")
        assert warm.returncode == 0 and warm.warm
        # `validate` prints an indented report: the supervisor relays each line as an "output" event
        assert warm_lines == cold_lines and '"valid": true' in "".join(e.get("text", "") for e in warm_lines)
        assert not psutil.pid_exists(spare) or psutil.Process(spare).status() == psutil.STATUS_ZOMBIE
        assert _Warm.proc is not None and _Warm.proc.pid != spare  # the next one is importing already
        _Warm.proc.kill()
        _Warm.proc.wait()
        third, third_lines = run("third")
        assert third.returncode == 0 and not third.warm and third_lines == cold_lines
    finally:
        _Warm.stop()
    assert _Warm.proc is None


def test_move_tree_renames_a_checkpoint_into_the_store_and_never_overwrites(tmp_path):
    """The worker's output folder lives under the store's root: it becomes the object by a rename
    (no copy of the weights); a taken key is refused and the source is left whole."""
    store = LocalStorage(tmp_path / "store")
    work = tmp_path / "store" / "work" / "out"
    (work / "sub").mkdir(parents=True)
    (work / "model.safetensors").write_bytes(b"w" * 1000)
    (work / "sub" / "manifest.json").write_text("{}")
    inode = (work / "model.safetensors").stat().st_ino
    uri = store.move_tree(work, "checkpoints/ftjob-x/ftckpt-1")
    final = tmp_path / "store" / "checkpoints" / "ftjob-x" / "ftckpt-1"
    assert not work.exists() and (final / "model.safetensors").stat().st_ino == inode  # renamed, not copied
    assert (final / "sub" / "manifest.json").read_text() == "{}" and store.exists(uri)

    again = tmp_path / "store" / "work" / "again"
    again.mkdir()
    (again / "x").write_text("x")
    with pytest.raises(FileExistsError):
        store.move_tree(again, "checkpoints/ftjob-x/ftckpt-1")
    assert (again / "x").read_text() == "x" and (final / "model.safetensors").stat().st_ino == inode
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
