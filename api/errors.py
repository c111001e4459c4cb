"""Every error leaves the API as OpenAI's envelope:
`{"error": {"message", "type", "param", "code"}}` with the matching status.

Status policy (chosen to match what OpenAI's SDK users expect, e.g. `BadRequestError`):
400 for anything wrong in the request (malformed JSON, unknown or missing parameters, values out
of range, query parameters of the wrong type: `param` names the field as a dotted path like
`method.sdpo.steps[0].training_file`); 401 bad key; 403 admin-only; 404 unknown route or object
(including another owner's object); 405 wrong method; 409 state conflicts; 413 too large.
422 is not used: FastAPI's request validation errors are reported as 400 like the rest.
A bug is a 500 with type `server_error` and no internals; the database being unreachable (a
restart) is a 503 `database_unavailable` with `Retry-After`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.db import is_transient_db_error
from core.errors import InvalidRequest, ServiceError
from core.storage import StorageUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers={**headers, **exc.headers})


def dotted(loc: Sequence[str | int]) -> str | None:
    """("method", "sdpo", "steps", 0, "training_file") -> "method.sdpo.steps[0].training_file"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def from_validation_errors(errors: Sequence[dict[str, Any]], *, drop_prefix: bool = False) -> InvalidRequest:
    """The first pydantic/FastAPI validation error as an `InvalidRequest` with OpenAI-style codes."""
    err = errors[0]
    loc = list(err.get("loc", ()))
    if drop_prefix and loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = dotted(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    message = err.get("msg", "invalid value")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    if param is None:
        return InvalidRequest(f"Invalid request body: {message}.", code=code)
    return InvalidRequest(f"Invalid value for '{param}': {message}.", param=param, code=code)


class RejectNulMiddleware:
    """400 for a NUL character anywhere in the URL (path or query), before any route runs: no
    database stores one, and Postgres refuses it in a query with an error that would be a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope.get("path", "")
                                        or b"%00" in scope.get("query_string", b"")
                                        or b"\x00" in scope.get("query_string", b"")):
            body = error_body("The request URL contains a NUL character.", code="invalid_value")
            response = JSONResponse(body, status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_middleware(RejectNulMiddleware)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(exc.errors(), drop_prefix=True))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            body = error_body(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif exc.status_code == 405:
            body = error_body(f"Method {request.method} is not allowed on {request.url.path}.",
                              code="method_not_allowed")
        else:
            body = error_body(str(exc.detail), code="http_error")
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sa_exc.DataError):
            # A value the database cannot hold (a NUL byte, an integer out of the column's range)
            # that got past the checks: the request's fault, not the server's.
            log.warning("refused a value on %s %s: %s", request.method, request.url.path,
                        (str(exc.orig or exc).splitlines() or [""])[0][:200])
            return JSONResponse(error_body("A value in the request cannot be stored or looked up.",
                                           code="invalid_value"), status_code=400)
        if isinstance(exc, StorageUnavailable):
            # The object store is away (after its client's retries): the client may retry.
            log.warning("the object store is unavailable on %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse(error_body("The file store is unavailable; retry later.", type="server_error",
                                           code="storage_unavailable"), status_code=503)
        if is_transient_db_error(exc):
            # The database is restarting or unreachable: not a bug, and the client may retry.
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                        type(exc.__cause__ or exc).__name__)
            return JSONResponse(
                error_body("The service's database is unavailable; retry shortly.", type="server_error",
                           code="database_unavailable"),
                status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        # Logged with its traceback for the operator; the client learns nothing internal.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("The server had an error while processing your request.", type="server_error",
                       code="internal_error"),
            status_code=500,
        )
