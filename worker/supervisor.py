"""Run one engine command in a child process and supervise it.

Training runs in a child (`python -m sdpo_engine step SPEC.json`) rather than in the Celery
process: a CUDA context, a leaked tensor or a segfault dies with the child, memory is returned to
the OS after every step, and a cancel is a signal rather than a cooperative flag inside a library
call. The supervisor relays the child's JSON lines as they arrive, beats the heartbeat, and asks
the caller's `control()` every poll whether to go on, stop (pause: save and exit) or kill (cancel).
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1

GO, PAUSE, CANCEL = "go", "pause", "cancel"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the worker process is killed (even with SIGKILL), the kernel sends the child SIGTERM: it
    # saves a resumable trainer checkpoint and exits instead of training on as an orphan.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


@dataclass
class ChildOutcome:
    returncode: int
    result: dict | None = None  # the engine's {"event": "result"} line
    error: dict | None = None  # the engine's {"event": "error"} line
    stopped: dict | None = None  # the engine's {"event": "stopped"} line
    action: str = GO  # what the supervisor did: go (ran to its end), pause or cancel
    last_metrics: dict | None = None
    lines: int = 0
    log_path: str | None = None
    tail: list[str] = field(default_factory=list)


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdpo_engine", *args]


def supervise(
    cmd: list[str],
    *,
    log_path: str | Path,
    relay: Callable[[list[dict]], None],
    control: Callable[[], str],
    heartbeat: Callable[[], None],
    heartbeat_seconds: float = 15.0,
    poll_seconds: float = 1.0,
    pause_grace_seconds: float = 600.0,
    env: dict | None = None,
) -> ChildOutcome:
    """Run `cmd`, relaying its JSON lines in batches; returns when the child has exited."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                                env=child_env, preexec_fn=_die_with_parent)
    lines: queue.Queue[str | None] = queue.Queue()

    def read():
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="engine-stdout", daemon=True)
    reader.start()

    outcome = ChildOutcome(returncode=-1, log_path=str(log_path))
    pending: list[dict] = []
    last_beat = last_poll = last_flush = time.monotonic()
    signalled_at: float | None = None
    eof = False
    while not eof:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line is None:
            eof = True
        elif line:
            outcome.lines += 1
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "output", "text": line.rstrip()[:2000]}
            kind = event.get("event")
            if kind == "result":
                outcome.result = event
            elif kind == "error":
                outcome.error = event
            elif kind == "stopped":
                outcome.stopped = event
            elif kind == "metrics":
                outcome.last_metrics = event
            pending.append(event)
        now = time.monotonic()
        if pending and (eof or now - last_flush >= 0.5 or len(pending) >= 200):
            relay(pending)
            pending = []
            last_flush = now
        if eof:
            break
        if now - last_beat >= heartbeat_seconds:
            heartbeat()
            last_beat = now
        if now - last_poll >= poll_seconds and outcome.action == GO:
            last_poll = now
            decision = control()
            if decision == CANCEL:
                # Nothing of a cancelled step is kept, so there is no state to save: kill at once.
                outcome.action = CANCEL
                _signal(proc, signal.SIGKILL)
            elif decision == PAUSE:
                outcome.action = PAUSE
                signalled_at = now
                _signal(proc, signal.SIGTERM)
        if signalled_at is not None and now - signalled_at > pause_grace_seconds:
            _signal(proc, signal.SIGKILL)
            signalled_at = None
    outcome.returncode = proc.wait()
    reader.join(timeout=5)
    outcome.tail = _tail(log_path)
    return outcome


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        # The child leads its own session: signal the whole group (tokenizer or dataloader
        # helpers included).
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            return fh.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []
