"""Frontend errors and their two shapes: OpenAI's envelope on /v1/* (and the vLLM tokenizer
routes), `{"error": message}` on the Saxml routes."""
from __future__ import annotations

from typing import Any

from client import errors as sax_errors

#: (OpenAI error type, metrics error type) by HTTP status.
_TYPES = {400: ("invalid_request_error", "invalid_request"), 401: ("authentication_error", "authentication"),
          403: ("permission_error", "permission"), 404: ("invalid_request_error", "not_found"),
          405: ("invalid_request_error", "invalid_request"), 413: ("invalid_request_error", "too_large"),
          429: ("rate_limit_error", "over_capacity"), 499: ("invalid_request_error", "client_disconnect"),
          502: ("server_error", "bad_gateway"),
          503: ("service_unavailable_error", "unavailable"), 504: ("timeout_error", "timeout")}


def kind_of(status: int) -> str:
    """The metrics label (error type) of an HTTP status."""
    return _TYPES.get(status, ("", "internal" if status >= 500 else "invalid_request"))[1]


class FrontendError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",))[0]
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        return kind_of(self.status)

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sax_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else {}


def invalid(message: str, param: str | None = None) -> FrontendError:
    return FrontendError(400, message, param=param)


def model_not_found(name: str) -> FrontendError:
    return FrontendError(404, f"The model `{name}` does not exist or is not published.", param="model",
                         code="model_not_found")


def from_sax_error(exc: sax_errors.SaxError, *, model: str | None = None) -> FrontendError:
    """Maps a client-library error (admin or routing) onto an HTTP answer."""
    _, code = sax_errors.error_message(exc.body)
    if isinstance(exc, sax_errors.DeadlineExceeded):
        return FrontendError(504, exc.message, code="upstream_timeout")
    if code == "queue_full" or isinstance(exc, sax_errors.ResourceExhausted):
        return FrontendError(429, f"{model or 'the model'} is at capacity; retry later", code="queue_full",
                             retry_after=1.0)
    if isinstance(exc, sax_errors.Unavailable) or exc.status in (404, 503) and model is not None:
        # Routing: no replica ready, every one refused or unreachable, or the admin is down.
        return FrontendError(503, exc.message, code="no_ready_replica",
                             retry_after=getattr(exc, "retry_after", None) or 1.0)
    if isinstance(exc, sax_errors.Unauthenticated):
        return FrontendError(401, exc.message, code="unauthenticated")
    if isinstance(exc, sax_errors.PermissionDenied):
        return FrontendError(403, exc.message, code="permission_denied")
    if isinstance(exc, sax_errors.NotFound):
        return FrontendError(404, exc.message, code="not_found")
    if isinstance(exc, sax_errors.AlreadyExists):
        return FrontendError(409, exc.message, code="already_exists")
    if isinstance(exc, sax_errors.InvalidArgument):
        return FrontendError(400, exc.message, code="invalid_argument")
    status = exc.status if exc.status and 400 <= exc.status < 600 else 502
    return FrontendError(status, exc.message)
