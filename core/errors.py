"""Domain errors. Each carries the HTTP status and the OpenAI-style `code`/`param` it maps to,
so the API has one handler that turns any of them into the error envelope, and services raise
meaning ("file not found") rather than HTTP.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a client can cause. Never carries internals in `message`."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        # Extra keys placed beside message/type/param/code (e.g. an upload's line-by-line errors).
        self.extra = extra or {}
        # Response headers the error calls for (Retry-After on a 429).
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                **self.extra}


class InvalidRequest(ServiceError):
    """400: the request is malformed or a value is not allowed."""

    status = 400
    code = "invalid_value"


class AuthenticationError(ServiceError):
    status = 401
    code = "invalid_api_key"


class PermissionDenied(ServiceError):
    status = 403
    code = "admin_required"


class NotFound(ServiceError):
    """404. Also used for objects that exist but belong to another owner: their existence must
    not leak."""

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """409: the request is valid but the object's state does not allow it."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "file_too_large"


class TooManyRequests(ServiceError):
    """429: a per-owner limit (active jobs) is reached; the request can succeed later."""

    status = 429
    code = "rate_limit_exceeded"


class ServiceUnavailable(ServiceError):
    """503: a dependency (the object store) cannot be reached; the request can be retried later."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class InvalidTransition(Conflict):
    """A status change that the state machine forbids (a bug or a race, never silently applied)."""

    code = "invalid_transition"
