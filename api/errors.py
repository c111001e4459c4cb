"""Every error leaves the API as OpenAI's envelope:
`{"error": {"message", "type", "param", "code"}}` with the matching status.

Status policy (chosen to match what OpenAI's SDK users expect, e.g. `BadRequestError`):
400 for anything wrong in the request (malformed JSON, unknown or missing parameters, values out
of range, query parameters of the wrong type: `param` names the field as a dotted path like
`method.sdpo.steps[0].training_file`); 401 bad key; 403 admin-only; 404 unknown route or object
(including another owner's object); 405 wrong method; 409 state conflicts; 413 too large.
422 is not used: FastAPI's request validation errors are reported as 400 like the rest.
A bug is a 500 with type `server_error` and no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InvalidRequest, ServiceError

log = logging.getLogger(__name__)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


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


def install_error_handlers(app: FastAPI) -> None:
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
        # Logged with its traceback for the operator; the client learns nothing internal.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("The server had an error while processing your request.", type="server_error",
                       code="internal_error"),
            status_code=500,
        )
