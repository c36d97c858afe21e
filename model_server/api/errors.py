"""API errors and the two error shapes: OpenAI's envelope on /v1/*, `{"error": msg}` elsewhere."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after = param, code, retry_after

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else {}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def from_engine_error(exc: Exception) -> ApiError:
    """Maps engine refusals onto HTTP: bad requests 400, a full queue 503 (retryable)."""
    from model_server.engine import InvalidRequest, QueueFull

    if isinstance(exc, QueueFull):
        return ApiError(503, f"model is at capacity: {exc}", type="overloaded_error", code="queue_full",
                        retry_after=getattr(exc, "retry_after", 1.0) or 1.0)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param=getattr(exc, "param", None))
    raise exc
