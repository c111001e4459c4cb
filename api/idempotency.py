"""`Idempotency-Key` for every POST.

With a key, the first successful response is stored with a hash of the request (method, path
and body). The same key with the same request returns that stored response again (same object,
same status) without doing the work twice; the same key with a different request is a 409
`idempotency_key_reused`. Errors are not stored: nothing was written, so a retry may run again.

Two concurrent requests with the same key both do the work, but only one can insert the key's
row (primary key owner+key): the loser's insert waits for the winner's commit, then fails; the
loser rolls back (its task is never sent, its upload is deleted) and returns the winner's stored
response. The request's commit itself is `api.deps.get_db`'s, after the route returned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import Principal
from core.errors import Conflict, InvalidRequest
from core.models import IdempotencyKey

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


def request_hash(request: Request, payload: Any) -> str:
    """sha256 of method, path and a canonical form of the payload (key order does not matter)."""
    canonical = json.dumps([request.method, request.url.path, payload], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters.", param=HEADER,
                             code="invalid_idempotency_key")
    return key


def _replay(db: Session, owner: str, key: str, digest: str) -> JSONResponse | None:
    row = db.get(IdempotencyKey, (owner, key))
    if row is None:
        return None
    if row.request_hash != digest:
        raise Conflict(f"The {HEADER} {key!r} was already used with a different request.", param=HEADER,
                       code="idempotency_key_reused")
    return JSONResponse(row.response_body, status_code=row.response_status,
                        headers={"Idempotent-Replayed": "true"})


def respond(
    request: Request,
    db: Session,
    principal: Principal,
    payload: Any,
    action: Callable[[], BaseModel],
    *,
    status_code: int = 200,
    stored_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> JSONResponse:
    """Run `action` (which adds rows and returns the response model) and respond with the model's
    JSON, honouring an `Idempotency-Key` header; the request's session commits when the route has
    returned (`api.deps.get_db`). `payload` is what identifies the request.

    `stored_body(body)` is what a replay gets instead of `body`, for a response that shows
    something once (a webhook's signing secret): the first response has it, the stored one not."""
    key = idempotency_key(request)
    if key is None:
        return JSONResponse(action().model_dump(mode="json"), status_code=status_code)

    digest = request_hash(request, payload)
    replay = _replay(db, principal.owner, key, digest)
    if replay is not None:
        # A replay writes nothing: what the request did before (an upload it stored) is undone now,
        # so that the commit that follows the route (api.deps.get_db) has nothing to keep.
        db.rollback()
        return replay
    body = action().model_dump(mode="json")
    db.add(IdempotencyKey(owner=principal.owner, key=key, request_hash=digest, response_status=status_code,
                          response_body=stored_body(body) if stored_body else body))
    try:
        # The key's row is inserted now, not at the commit: a concurrent request that inserted it
        # first makes this flush fail (on Postgres it waits for that request's commit).
        db.flush()
    except IntegrityError:
        db.rollback()  # drops our queued tasks and undoes our stored objects
        replay = _replay(db, principal.owner, key, digest)
        if replay is None:
            raise
        return replay
    return JSONResponse(body, status_code=status_code)
