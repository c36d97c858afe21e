"""Typed admin errors, each with its HTTP status and a stable code for clients."""
from __future__ import annotations

from common.naming import InvalidArgument


class AdminError(Exception):
    status = 500
    code = "INTERNAL"


class NotFound(AdminError):
    status = 404
    code = "NOT_FOUND"


class AlreadyExists(AdminError):
    status = 409
    code = "ALREADY_EXISTS"


class Conflict(AdminError):
    """A retryable conflict, e.g. publishing a model that is still unpublishing."""
    status = 409
    code = "UNAVAILABLE"


class FailedPrecondition(AdminError):
    """Refused until something else changes, e.g. unpublishing a base that adapters need."""
    status = 409
    code = "FAILED_PRECONDITION"


class Unauthenticated(AdminError):
    status = 401
    code = "UNAUTHENTICATED"


class PermissionDenied(AdminError):
    status = 403
    code = "PERMISSION_DENIED"


def status_and_code(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, InvalidArgument):
        return 400, "INVALID_ARGUMENT"
    if isinstance(exc, AdminError):
        return exc.status, exc.code
    return 500, "INTERNAL"
