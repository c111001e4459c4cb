"""Request dependencies: the database session, the caller's identity, and the app's services.

No request holds a database transaction (on SQLite: the write lock; on Postgres: a pooled
connection) while it waits on its client:

- the key check (`get_principal`) reads in a short transaction of its own, closed before the
  endpoint reads the request body;
- the request's session (`get_db`) is opened lazily by the endpoint's first query and closed as
  soon as the endpoint has built its response (FastAPI's `scope="function"`), before a byte of the
  response is sent, so a slow reader or a streamed download holds nothing;
- GET and HEAD requests get a read-only session (`core.db.read_only_session`: no write lock on
  SQLite).

The request's session is its unit of work, and the one place a request commits: a POST or DELETE
whose endpoint returned without raising is committed by `get_db` (after the endpoint built its
response, before a byte of it is sent; a failing commit is answered like any error); an endpoint
that raised is rolled back. Routers and services never commit: they add and flush. Tasks are
sent, and stored objects deleted, by after-commit callbacks (`core.db.after_commit`,
`core.queue.enqueue_after_commit`); anything not committed runs its after-rollback callbacks
(e.g. deleting an upload that was stored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.slowloris import rate_limited_body
from core.db import close_session, read_only_session
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


_READ_METHODS = ("GET", "HEAD")


def _request_session(request: Request, services: AppServices = Depends(get_services)) -> Iterator[Session]:
    read_only = request.method in _READ_METHODS
    session = read_only_session(services.session_factory) if read_only else services.session_factory()
    request.state.db_session = session  # for api.slowloris' check that it is idle while the body arrives
    try:
        yield session
        # Reached only when the endpoint returned: an exception it raised is thrown in at the
        # `yield` and leaves by `finally`, which rolls back.
        if not read_only:
            session.commit()
    finally:
        close_session(session)


def get_db(session: Session = Depends(_request_session, scope="function")) -> Session:
    """The request's session, committed (a write request whose endpoint returned) or rolled back
    (an endpoint that raised, or any GET/HEAD) and closed once the endpoint has returned (its
    response built, not yet sent). A plain function around the generator, so that every
    `Depends(get_db)` gets that early close without saying `scope="function"` itself."""
    return session


# auto_error=False: a missing header must give our 401 envelope, not FastAPI's 403. Declaring the
# scheme also puts the "Authorize" button in /docs.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk-sdpo-…`")

_NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
           "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
# The key itself is never echoed or logged, not even in part.
_BAD_KEY = "Incorrect API key provided. Create a key with `sdpo keys create`."


def get_principal(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    services: AppServices = Depends(get_services),
) -> Principal:
    """The caller of a valid, unrevoked key; 401 otherwise. Read in a transaction of its own that
    is over (connection back in the pool) before the endpoint runs."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthenticationError(_NO_KEY)
    with read_only_session(services.session_factory) as session:
        row = find_active_key(session, credentials.credentials.strip())
        if row is None:
            raise AuthenticationError(_BAD_KEY)
        return Principal(owner=row.owner, key_id=row.id, is_admin=row.is_admin)


def require_admin(principal: Principal = Depends(get_principal)) -> Principal:
    if not principal.is_admin:
        raise PermissionDenied("This endpoint needs an admin key.", code="admin_required")
    return principal


# A job spec is a few kilobytes; anything near this is a mistake or an attack.
MAX_JSON_BODY_BYTES = 1 << 20


# json.loads joins an escaped pair ("\ud83d\ude00") into one character, and decodes the bytes of a
# UTF-8-encoded surrogate too (surrogatepass): what is left in the text is unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    async for chunk in rate_limited_body(request):
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
    _reject_bad_text(value)
    return value


def _reject_bad_text(value: Any) -> None:
    """No string of a body (key or value) may hold a NUL character (Postgres refuses them in text)
    or a lone UTF-16 surrogate (`"\\ud800"` is valid JSON but no Unicode text: it cannot be
    stored or encoded as UTF-8). 400 `invalid_value` for either, before anything is written."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidRequest("The request body contains a NUL character (\\u0000).",
                                     code="invalid_value")
            if _SURROGATE.search(item):
                raise InvalidRequest("The request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff) "
                                     "in a string: it is not valid Unicode text.", code="invalid_value")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
