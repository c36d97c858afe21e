"""Typed client errors, mapped from the admin's and model servers' HTTP answers."""
from __future__ import annotations

from typing import Any


class SaxError(Exception):
    """Base class; `status` is the HTTP status when there was one."""
    retryable = False

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.message, self.status, self.body = message, status, body


class InvalidArgument(SaxError):
    pass


class NotFound(SaxError):
    pass


class AlreadyExists(SaxError):
    pass


class PermissionDenied(SaxError):
    pass


class FailedPrecondition(SaxError):
    """Refused until something else changes (e.g. a base model's adapters are unpublished)."""


class Unauthenticated(PermissionDenied):
    pass


class Unavailable(SaxError):
    """The cell cannot serve this now (no replica, overloaded, admin down); retry later."""
    retryable = True


class ResourceExhausted(Unavailable):
    pass


class DeadlineExceeded(SaxError):
    pass


class Internal(SaxError):
    pass


class Cancelled(SaxError):
    """The call was given up: whoever waited for its answer went away."""


_BY_CODE = {"INVALID_ARGUMENT": InvalidArgument, "NOT_FOUND": NotFound, "ALREADY_EXISTS": AlreadyExists,
            "PERMISSION_DENIED": PermissionDenied, "UNAUTHENTICATED": Unauthenticated,
            "UNAVAILABLE": Unavailable, "FAILED_PRECONDITION": FailedPrecondition}


def error_message(body: Any) -> tuple[str, str | None]:
    """(message, code) from either error shape: {"error": {"message"/"code"}} or {"error": "msg"}."""
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err)), err.get("code")
        if err is not None:
            return str(err), None
    return str(body)[:500], None


def from_response(status: int, body: Any) -> SaxError:
    message, code = error_message(body)
    cls = _BY_CODE.get(code or "")
    if cls is None:
        cls = {400: InvalidArgument, 401: Unauthenticated, 403: PermissionDenied, 404: NotFound,
               409: AlreadyExists, 413: InvalidArgument, 422: InvalidArgument, 429: ResourceExhausted,
               503: Unavailable, 504: DeadlineExceeded}.get(status, Internal if status >= 500 else SaxError)
    return cls(message, status, body)
