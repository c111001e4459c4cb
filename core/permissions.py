"""Owner-only files under SDPO_HOME: the database (webhook secrets, stored idempotent replies), the
broker's file, storage (users' data and models), logs and the admin key.

Two layers, because either alone misses something:

- `restrict_umask()` where a service process starts (`sdpo up`, the worker, the API's app factory):
  every file and folder that process or its children create (SQLite's -wal/-shm, Celery's beat
  schedule, the engine's checkpoints, whatever a library writes) is at most 0600/0700.
- explicit modes where a file is created by our code (`create_private_file`, `open_private_append`,
  `make_private_dir`), so the mode holds even in a process that embeds this code with a wider
  umask (a test runner, another program calling `create_app`).

Files and folders that already exist keep their modes: an existing deployment keeps working, and
an operator who chose wider modes on purpose keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

OWNER_ONLY_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700


def restrict_umask() -> int:
    """Make this process's new files owner-only (umask 077, inherited by its children); returns
    the previous umask. Only ever narrows: bits already masked stay masked."""
    previous = os.umask(OWNER_ONLY_UMASK)
    os.umask(previous | OWNER_ONLY_UMASK)
    return previous


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """`mkdir -p` with mode 0700 for every folder it creates (existing ones are left as they are)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask; the result must not be
    return path


def create_private_file(path: str | os.PathLike[str]) -> bool:
    """Create `path` empty with mode 0600 if it does not exist (its folder too, 0700); True if it
    was created. Used before a library (SQLite) opens the file with its own, wider default."""
    make_private_dir(Path(path).parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def open_private_append(path: str | os.PathLike[str]) -> BinaryIO:
    """`open(path, "ab")`, a new file being created with mode 0600 (a log)."""
    make_private_dir(Path(path).parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    return os.fdopen(fd, "ab")
