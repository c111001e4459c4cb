"""Public ids: a readable prefix and 24 random hex digits (`file-…`, `ftjob-…`, `ftckpt-…`)."""

from __future__ import annotations

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
