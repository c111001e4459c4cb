"""Public ids: a readable prefix and 24 random hex digits (`file-…`, `ftjob-…`, `ftckpt-…`)."""

from __future__ import annotations

import hashlib
import secrets

FILE = "file"
JOB = "ftjob"
STEP = "ftstep"
CHECKPOINT = "ftckpt"
EVENT = "ftevent"
API_KEY = "key"


def new_id(prefix: str) -> str:
    # 96 random bits: unguessable, so an id leaks nothing and cannot be enumerated.
    return f"{prefix}-{secrets.token_hex(12)}"


def derived_id(prefix: str, *parts: str) -> str:
    """An id of the same shape named by `parts` (e.g. a job id and what the event is about), for a record
    written at most once however often its writer runs: as unguessable as the random id in `parts`."""
    return f"{prefix}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:24]}"
