"""Request dependencies: the database session, the caller's identity, and the app's services.

The session is opened per request and closed at its end; the request (the route, through
`api.idempotency.respond`) commits. Anything not committed is rolled back, and its registered
after-rollback callbacks (e.g. deleting an upload that was stored) run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from core.db import close_session
from core.errors import AuthenticationError, InvalidRequest, PayloadTooLarge, PermissionDenied
from core.keys import find_active_key
from core.settings import Settings
from core.storage import Storage


@dataclass
class AppServices:
    """What create_app builds once and every request uses (kept on app.state.services)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage
    celery: Celery


@dataclass(frozen=True)
class Principal:
    """The caller: the owner its key belongs to. Every query filters on `owner`."""

    owner: str
    key_id: str
    is_admin: bool


def get_services(request: Request) -> AppServices:
    return request.app.state.services


def get_db(services: AppServices = Depends(get_services)) -> Iterator[Session]:
    session = services.session_factory()
    try:
        yield session
    finally:
        close_session(session)


# auto_error=False: a missing header must give our 401 envelope, not FastAPI's 403. Declaring the
# scheme also puts the "Authorize" button in /docs.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk-sdpo-…`")

_NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
           "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
# The key itself is never echoed or logged, not even in part.
_BAD_KEY = "Incorrect API key provided. Create a key with `sdpo keys create`."


def get_principal(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    db: Session = Depends(get_db),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthenticationError(_NO_KEY)
    row = find_active_key(db, credentials.credentials.strip())
    if row is None:
        raise AuthenticationError(_BAD_KEY)
    return Principal(owner=row.owner, key_id=row.id, is_admin=row.is_admin)


def require_admin(principal: Principal = Depends(get_principal)) -> Principal:
    if not principal.is_admin:
        raise PermissionDenied("This endpoint needs an admin key.", code="admin_required")
    return principal


# A job spec is a few kilobytes; anything near this is a mistake or an attack.
MAX_JSON_BODY_BYTES = 1 << 20


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request: Request) -> Any:
    """The request body parsed as JSON; 400 `invalid_json` otherwise.

    Bodies are parsed here rather than by FastAPI so that every shape error can be reported in
    the same envelope with a dotted `param`, and unknown fields refused.
    """
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge(f"The request body is larger than {MAX_JSON_BODY_BYTES} bytes.",
                              code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY_BYTES:  # a chunked body without Content-Length
            raise PayloadTooLarge(f"The request body is larger than {MAX_JSON_BODY_BYTES} bytes.",
                                  code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, absurd nesting or integers
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    _reject_nul(value)
    return value


def _reject_nul(value: Any) -> None:
    """No string of a body (key or value) may hold a NUL character: Postgres refuses them in text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidRequest("The request body contains a NUL character (\\u0000).",
                                     code="invalid_value")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
