"""Run one engine command in a child process and supervise it.

Training runs in a child (`python -m sdpo_engine step SPEC.json`) rather than in the Celery
process: a CUDA context, a leaked tensor or a segfault dies with the child, memory is returned to
the OS after every step, and a cancel is a signal rather than a cooperative flag inside a library
call. The supervisor relays the child's JSON lines as they arrive, beats the heartbeat, and asks
the caller's `control()` every poll whether to go on, stop (pause: save and exit) or kill (cancel).

A child pays about 8 s (on 2 CPU cores) importing torch, transformers and TRL before it can load a
model: more than a whole step of a small model. So with `warm=True` the supervisor keeps one
engine process started ahead of need (`python -m sdpo_engine warm`, which imports everything, then
waits on stdin): a step takes it and hands it its argv and log file, and a new one starts importing
as soon as that step's training ends (its `train_end` line, or its exit): the import then overlaps
the checkpoint save, hashing, copy into the store and the database commit, and never takes CPU from
training (measured on 2 cores: starting it with the step made SmolLM2's training 1.8x slower).
Steps 2..T of a job (and every step after the first one a worker runs) start without the import. The warm process is started with the same environment as a cold child (`child_environment`: an
allow-list, so the worker's secrets never reach it),
dies with the worker (PDEATHSIG, and end of stdin), and is replaced if it died.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
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

from core.permissions import make_private_dir, open_private_append
from sdpo_engine.protocol import EventKind, InfoPhase

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0
MAX_PENDING_EVENTS = 100_000
QUIET_SECONDS = 30.0

GO, PAUSE, CANCEL = "go", "pause", "cancel"

# What an engine process may see of the worker's environment: an allow-list, not a deny-list, so a
# secret added to the worker's environment later (the admin key, the metrics token, database and
# broker URLs with their passwords, webhook secrets, AWS_* or other cloud credentials) never reaches
# the code that loads models and user data. The engine reads files named in its spec, and its training
# settings (device, packing, padding, activation checkpointing) from the spec too (core.settings fills
# them); it needs only the interpreter's, the libraries' and the accelerator's settings.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP",
    "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "TQDM_DISABLE", "TOKENIZERS_PARALLELISM", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "SDPO_LOG_FORMAT",
})
CHILD_ENV_PREFIXES = ("PYTHON", "LC_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                      "CUDNN_", "CUBLAS_", "NCCL_", "NVIDIA_", "TRITON_", "ACCELERATE_", "OMP_", "MKL_", "KMP_",
                      "OPENBLAS_", "GOTO_", "VECLIB_", "NUMEXPR_")


# Credentials inside an allowed prefix: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, HF_HUB_TOKEN, a *_API_KEY... The
# engine never reaches a model hub (models are resolved to local or store paths before the step starts,
# offline), so a hub token would only hand user-supplied files and templates a credential to leak.
CHILD_ENV_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "ACCESS_KEY",
                            "PRIVATE_KEY", "AUTH")


def _child_may_see(name: str) -> bool:
    if name in CHILD_ENV_NAMES:  # exact names, e.g. TOKENIZERS_PARALLELISM (a setting, not a token)
        return True
    upper = name.upper()
    return name.startswith(CHILD_ENV_PREFIXES) and not any(marker in upper for marker in CHILD_ENV_SECRET_MARKERS)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an engine process gets: the allow-listed part of this process's
    (`CHILD_ENV_NAMES`, `CHILD_ENV_PREFIXES`, minus credential-looking names inside the prefixes:
    `CHILD_ENV_SECRET_MARKERS`), unbuffered output, no progress bars, then `extra`."""
    env = {name: value for name, value in os.environ.items() if _child_may_see(name)}
    return {**env, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(extra or {})}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the worker process is killed (even with SIGKILL), the kernel sends the child SIGTERM: it
    # saves a resumable trainer checkpoint and exits instead of training on as an orphan.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


class _Warm:
    """The one engine process this worker process keeps started ahead of its next step."""

    lock = threading.Lock()
    proc: subprocess.Popen | None = None
    env: dict | None = None

    @classmethod
    def take(cls, env: dict) -> subprocess.Popen | None:
        with cls.lock:
            proc, cls.proc = cls.proc, None
            same_env, cls.env = cls.env == env, None
        if proc is None:
            return None
        if proc.poll() is not None or not same_env:
            cls._discard(proc)
            return None
        return proc

    @classmethod
    def start(cls, env: dict) -> None:
        with cls.lock:
            if cls.proc is not None and cls.proc.poll() is None and cls.env == env:
                return
            old, cls.proc, cls.env = cls.proc, None, None
        if old is not None:
            cls._discard(old)
        try:
            proc = subprocess.Popen(engine_command("warm"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=env, preexec_fn=_die_with_parent)
        except OSError as exc:
            log.warning("could not start a warm engine process (%s); steps start cold", exc)
            return
        with cls.lock:
            cls.proc, cls.env = proc, env

    @classmethod
    def stop(cls) -> None:
        with cls.lock:
            proc, cls.proc, cls.env = cls.proc, None, None
        if proc is not None:
            cls._discard(proc)

    @staticmethod
    def _discard(proc: subprocess.Popen) -> None:
        try:
            if proc.stdin:
                proc.stdin.close()  # a waiting warm process exits on end of input
        except OSError:
            pass
        if proc.poll() is None:
            _signal(proc, signal.SIGKILL)
        proc.wait()


atexit.register(_Warm.stop)


def _hand_over(proc: subprocess.Popen, args: list[str], log_path: Path) -> bool:
    """Give a warm process its order; False if it is gone (the caller starts a cold child)."""
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"argv": args, "log": str(log_path)}) + "\n")
        proc.stdin.close()
        return True
    except (OSError, ValueError):
        _Warm._discard(proc)
        return False


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
    warm: bool = False  # ran in a warm process (imports done before the step was known)


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
    flush_seconds: float = 300.0,
    env: dict | None = None,
    warm: bool = False,
) -> ChildOutcome:
    """Run `cmd`, relaying its JSON lines in batches; returns when the child has exited.

    The callbacks write to the database, which may be restarting: a failing `relay` keeps its
    events and is tried again (with a growing pause) until it succeeds, a failing `heartbeat` is
    tried again at the next poll, and a failing `control` counts as "go on". Training is never
    stopped because the database did not answer for a while; the last events are flushed, for up to
    `flush_seconds`, once the child has exited. If the supervisor itself fails, the child is killed:
    a step never trains on unsupervised.

    `warm` (engine commands only): run in the warm process if one is ready, and start the next one.
    The child (warm or cold) gets `child_environment(env)`, never the worker's whole environment.
    """
    log_path = Path(log_path)
    make_private_dir(log_path.parent)
    child_env = child_environment(env)
    prefix = engine_command()
    warm = warm and cmd[:len(prefix)] == prefix
    proc = _Warm.take(child_env) if warm else None
    if proc is not None and not _hand_over(proc, cmd[len(prefix):], log_path):
        proc = None
    took_warm = proc is not None
    if proc is None:
        with open_private_append(log_path) as log_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                                    text=True, env=child_env, preexec_fn=_die_with_parent)
    def prepare_next() -> None:
        if warm:
            _Warm.start(child_env)

    try:
        outcome = _supervise(proc, log_path, relay=relay, control=control, heartbeat=heartbeat,
                             heartbeat_seconds=heartbeat_seconds, poll_seconds=poll_seconds,
                             pause_grace_seconds=pause_grace_seconds, flush_seconds=flush_seconds,
                             training_done=prepare_next)
        prepare_next()  # a step that ended without training (error, cancel, pause): no-op if started
        outcome.warm = took_warm
        return outcome
    except BaseException:
        if proc.poll() is None:
            _signal(proc, signal.SIGKILL)
            proc.wait()
        raise


def _supervise(proc: subprocess.Popen, log_path: Path, *, relay, control, heartbeat, heartbeat_seconds: float,
               poll_seconds: float, pause_grace_seconds: float, flush_seconds: float,
               training_done: Callable[[], None] = lambda: None) -> ChildOutcome:
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
    start = time.monotonic()
    last_beat = last_poll = last_flush = start
    beat_due = False
    quiet = _Quiet()
    relay_retry_at = 0.0
    relay_delay = RETRY_FIRST_DELAY_S
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
            if not isinstance(event, dict):
                event = {"event": "output", "text": line.rstrip()[:2000]}
            kind = event.get("event")
            if kind == EventKind.RESULT:
                outcome.result = event
            elif kind == EventKind.ERROR:
                outcome.error = event
            elif kind == EventKind.STOPPED:
                outcome.stopped = event
            elif kind == EventKind.METRICS:
                outcome.last_metrics = event
            elif kind == EventKind.INFO and event.get("phase") == InfoPhase.TRAIN_END:
                training_done()
            pending.append(event)
            if len(pending) > MAX_PENDING_EVENTS:  # the database has been away for very long
                del pending[: len(pending) - MAX_PENDING_EVENTS]
        now = time.monotonic()
        if eof:
            break
        if pending and now >= relay_retry_at and (now - last_flush >= 0.5 or len(pending) >= 200):
            if _attempt("relaying events", relay, pending, quiet=quiet):
                pending = []
                relay_delay = RETRY_FIRST_DELAY_S
            else:
                relay_retry_at = now + relay_delay
                relay_delay = min(relay_delay * 2, RETRY_MAX_DELAY_S)
            last_flush = now
        if (beat_due and now - last_beat >= poll_seconds) or now - last_beat >= heartbeat_seconds:
            # A failed beat is tried again at the next poll rather than a whole period later.
            beat_due = not _attempt("heartbeat", heartbeat, quiet=quiet)
            last_beat = now
        if now - last_poll >= poll_seconds and outcome.action == GO:
            last_poll = now
            try:
                decision = control()
            except Exception as exc:
                quiet.warn("control check", exc, "training goes on")
                decision = GO
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
    # The child is gone; its last lines (the result among them) still go to the database.
    deadline = time.monotonic() + flush_seconds
    while pending:
        if _attempt("relaying the last events", relay, pending, quiet=quiet):
            break
        if time.monotonic() + relay_delay > deadline:
            log.error("dropped %d engine events: the database did not come back in %.0f s", len(pending),
                      flush_seconds)
            break
        time.sleep(relay_delay)
        relay_delay = min(relay_delay * 2, RETRY_MAX_DELAY_S)
    return outcome


class _Quiet:
    """Warns of a failing callback once, then at most every QUIET_SECONDS, not at every retry."""

    def __init__(self):
        self.last: dict[str, float] = {}

    def warn(self, what: str, exc: Exception, then: str = "will retry") -> None:
        now = time.monotonic()
        if now - self.last.get(what, -QUIET_SECONDS) >= QUIET_SECONDS:
            self.last[what] = now
            log.warning("%s failed (%s: %s); %s", what, type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:200], then)

    def ok(self, what: str) -> None:
        if self.last.pop(what, None) is not None:
            log.warning("%s works again", what)


def _attempt(what: str, callback: Callable[..., None], *args, quiet: _Quiet) -> bool:
    try:
        callback(*args)
    except Exception as exc:
        quiet.warn(what, exc)
        return False
    quiet.ok(what)
    return True


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
