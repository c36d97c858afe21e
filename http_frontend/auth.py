"""API keys on data routes, the admin token on mutations.

Data routes: with API keys set, a Bearer key from the list (or the admin token)
is required: none or a wrong one -> 401. Mutations (publish, unpublish,
update): with an admin token set, it is required: a data key -> 403, nothing or
anything else -> 401; without one, they need what data routes need.
"""
from __future__ import annotations

import hashlib
import hmac
from functools import wraps
from typing import Any, Callable

from flask import current_app, request

from http_frontend.errors import FrontendError
from http_frontend.settings import FrontendSettings

DATA, ADMIN, OPEN = "data", "admin", "open"


def bearer() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _is_key(given: str, keys: tuple[str, ...]) -> bool:
    return any(_matches(given, k) for k in keys)  # no early exit: constant time over the list


def check(settings: FrontendSettings, level: str) -> None:
    """Raises FrontendError (401/403) unless the request may call a route of `level`."""
    if level == OPEN:
        return
    given = bearer()
    token = settings.admin_token
    if level == ADMIN and token:
        if given is not None and _matches(given, token):
            return
        if given is not None and _is_key(given, settings.api_keys):
            raise FrontendError(403, "this key may not publish, unpublish or update models; "
                                     "use the admin token", code="permission_denied")
        raise FrontendError(401, "a valid admin token is required (Authorization: Bearer ...)",
                            code="invalid_api_key")
    if not settings.api_keys:
        return
    if given is not None and (_is_key(given, settings.api_keys) or token and _matches(given, token)):
        return
    raise FrontendError(401, "Incorrect API key provided." if given else
                        "Missing API key: send it as Authorization: Bearer <key>.", code="invalid_api_key")


def caller(settings: FrontendSettings) -> str:
    """Whom a request counts against for per-key limits: a hash of its key when that is one of
    the configured keys (or the admin token), else the one shared anonymous caller (an open
    frontend takes any token: counting each apart would let callers mint fresh counts)."""
    given = bearer()
    if given is not None and (_is_key(given, settings.api_keys)
                              or settings.admin_token and _matches(given, settings.admin_token)):
        return "key:" + hashlib.sha256(given.encode()).hexdigest()[:32]
    return "anonymous"


def guarded(level: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Checks the caller's key for a route of `level` before the view runs. The view keeps its
    level as `auth_level` (views without one are open: see `level_of`)."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check(current_app.extensions["sax_frontend"].settings, level)
            return fn(*args, **kwargs)
        wrapper.auth_level = level  # type: ignore[attr-defined]
        return wrapper
    return deco


def level_of(view: Callable[..., Any]) -> str:
    """The auth level a view function was declared with (OPEN when it has none)."""
    return getattr(view, "auth_level", OPEN)
