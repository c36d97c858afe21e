"""The admin's JSON API (documented in README.md, "Admin API").

Errors are `{"error": {"code": ..., "message": ...}}` with 400/401/403/404/409;
5xx only for real faults (e.g. the database being unreachable: 503).
"""
from __future__ import annotations

import hmac
import logging
import time
from functools import wraps
from typing import Any, Callable

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from admin_server import state
from admin_server.errors import AdminError, PermissionDenied, Unauthenticated, status_and_code
from admin_server.lease import current_lease
from admin_server.naming import InvalidArgument, parse_cell

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)
MAX_LONG_POLL_S = 60.0


def ctx():  # type: ignore[no-untyped-def]
    return current_app.extensions["sax_admin"]


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


@bp.app_errorhandler(Exception)
def _handle(exc: Exception):  # type: ignore[no-untyped-def]
    if isinstance(exc, HTTPException):
        return error_response(exc.code or 500, exc.name.upper().replace(" ", "_"), exc.description or "")
    if isinstance(exc, (OperationalError, DBAPIError)) and not isinstance(exc, AdminError):
        log.warning("database unavailable: %s", exc)
        return error_response(503, "UNAVAILABLE", "the cell database is unavailable; retry")
    status, code = status_and_code(exc)
    if status >= 500:
        log.exception("internal error")
        return error_response(status, code, "internal error")
    return error_response(status, code, str(exc))


def _bearer() -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def require(token_attr: str) -> Callable:  # type: ignore[type-arg]
    """Guards a route with the admin or cluster token when that token is configured."""
    def deco(fn: Callable) -> Callable:  # type: ignore[type-arg]
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            expected = getattr(ctx().settings, token_attr)
            if expected:
                given = _bearer()
                if not given:
                    raise Unauthenticated("missing bearer token")
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    raise PermissionDenied("invalid token for this operation")
            return fn(*args, **kwargs)
        return wrapper
    return deco


def body() -> dict[str, Any]:
    if not request.content_length and not request.data:
        return {}
    data = request.get_json(silent=True, force=True)
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def _model_id(name: str) -> str:
    return "/" + name.strip("/")


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    c = ctx()
    try:
        with c.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        return error_response(503, "UNAVAILABLE", f"database unreachable: {e.__class__.__name__}")
    return jsonify({"status": "ok", "cell": c.settings.cell,
                    "leader": bool(c.leader and c.leader.lease.is_leader())})


@bp.get("/leader")
def leader():  # type: ignore[no-untyped-def]
    from admin_server.leader import lease_name
    return jsonify(current_lease(ctx().engine, lease_name(ctx().settings)) or {})


@bp.post("/models")
@require("admin_token")
def publish():  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions.begin() as s:
        model = state.publish(s, c.settings, body())
        detail = state.model_detail(s, c.settings, model)
    c.wake_leader()
    return jsonify(detail), 201


@bp.get("/models")
def list_models():  # type: ignore[no-untyped-def]
    c = ctx()
    args = {**body(), **request.args.to_dict()}
    cell = parse_cell(args.get("cell") or c.settings.cell)
    detail = str(args.get("detail", "")).lower() in ("1", "true", "yes")
    with c.sessions() as s:
        models = state.list_models(s, c.settings, cell)
        if detail:
            return jsonify({"models": [state.model_detail(s, c.settings, m) for m in models]})
        return jsonify({"models": [m.model_id for m in models]})


@bp.get("/models/<path:name>")
def get_model(name: str):  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions() as s:
        return jsonify(state.get_detail(s, c.settings, _model_id(name)))


@bp.route("/models/<path:name>", methods=["PATCH", "PUT"])
@require("admin_token")
def update_model(name: str):  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions.begin() as s:
        model = state.update_model(s, c.settings, _model_id(name), body())
        detail = state.model_detail(s, c.settings, model)
    c.wake_leader()
    return jsonify(detail)


@bp.delete("/models/<path:name>")
@require("admin_token")
def unpublish(name: str):  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions.begin() as s:
        state.unpublish(s, c.settings, _model_id(name))
    c.wake_leader()
    return jsonify({"model_id": _model_id(name)})


@bp.get("/servers")
def servers():  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions() as s:
        return jsonify({"servers": state.list_servers(s, c.settings)})


@bp.get("/stats")
def stats():  # type: ignore[no-untyped-def]
    c = ctx()
    from admin_server.leader import lease_name
    with c.sessions() as s:
        out = state.stats(s, c.settings)
    out["leader"] = current_lease(c.engine, lease_name(c.settings))
    return jsonify(out)


@bp.post("/heartbeat")
@require("cluster_token")
def heartbeat():  # type: ignore[no-untyped-def]
    return jsonify(ctx().heartbeats.record(body()))


@bp.get("/locate/<path:name>")
def locate(name: str):  # type: ignore[no-untyped-def]
    """Ready replica addresses. With ?version=V&timeout=T, waits until the answer's
    version differs from V (or T seconds pass) before answering."""
    c = ctx()
    known = request.args.get("version")
    try:
        timeout = min(float(request.args.get("timeout", 0)), MAX_LONG_POLL_S)
    except ValueError:
        raise InvalidArgument("timeout must be a number of seconds") from None
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        with c.sessions() as s:
            answer = state.locate(s, c.settings, _model_id(name))
        if not known or answer["version"] != known or time.monotonic() >= deadline:
            return jsonify(answer)
        time.sleep(min(c.poll_interval_s, max(deadline - time.monotonic(), 0.0)))
