"""The admin's JSON API (documented in admin_server/README.md, "Admin API").

Errors are `{"error": {"code": ..., "message": ...}}` with 400/401/403/404/409;
5xx only for real faults (e.g. the database being unreachable: 503).
"""
from __future__ import annotations

import hmac
import logging
import math
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
from common.naming import InvalidArgument, parse_cell
from common.http import parse_json, read_body
from admin_server.snapshot import wait_for_snapshot

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)
MAX_LONG_POLL_S = 60.0


def ctx():  # type: ignore[no-untyped-def]
    return current_app.extensions["sax_admin"]


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    """The admin's error shape (asgi.py's heartbeat route writes the same)."""
    return jsonify({"error": {"code": code, "message": message}}), status


def describe_error(exc: Exception) -> tuple[int, str, str]:
    """(HTTP status, code, message) for an exception escaping a route."""
    if isinstance(exc, HTTPException):
        return exc.code or 500, exc.name.upper().replace(" ", "_"), exc.description or ""
    if isinstance(exc, (OperationalError, DBAPIError)) and not isinstance(exc, AdminError):
        log.warning("database unavailable: %s", exc)
        return 503, "UNAVAILABLE", "the cell database is unavailable; retry"
    status, code = status_and_code(exc)
    if status >= 500:
        log.exception("internal error")
        return status, code, "internal error"
    return status, code, str(exc)


@bp.app_errorhandler(Exception)
def _handle(exc: Exception):  # type: ignore[no-untyped-def]
    return error_response(*describe_error(exc))


def _matches(given: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())  # type: ignore[union-attr]


def check_token(expected: str | None, authorization: str, other: str | None = None) -> None:
    """Raises unless `authorization` carries `expected` as its bearer token (when one is set):
    none or an unknown token -> Unauthenticated (401); `other`, the cell's token for the other
    kind of route, -> PermissionDenied (403)."""
    if not expected:
        return
    given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    if not given:
        raise Unauthenticated("missing bearer token")
    if not _matches(given, expected):
        if _matches(given, other):
            raise PermissionDenied("this token may not be used for this operation")
        raise Unauthenticated("invalid bearer token")


def require(token_attr: str) -> Callable:  # type: ignore[type-arg]
    """Guards a route with the admin or cluster token when that token is configured."""
    def deco(fn: Callable) -> Callable:  # type: ignore[type-arg]
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            settings = ctx().settings
            other = settings.cluster_token if token_attr == "admin_token" else settings.admin_token
            check_token(getattr(settings, token_attr), request.headers.get("Authorization", ""), other)
            return fn(*args, **kwargs)
        return wrapper
    return deco


def body() -> dict[str, Any]:
    return json_object(read_body(request))


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object ({} when empty); InvalidArgument otherwise."""
    if not raw:
        return {}
    try:
        data = parse_json(raw)
    except ValueError:
        data = None
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
        version = state.cell_version(s, c.settings.cell_name)
    c.wake_leader()
    return jsonify({**detail, "snapshot": _durable(version)}), 201


def _durable(version: int) -> dict[str, Any]:
    """Waits for the snapshot of a committed change (see snapshot.wait_for_snapshot)."""
    c = ctx()
    return wait_for_snapshot(c.engine, c.settings.cell_name, version, c.settings.snapshot_wait_s, c.leader)


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
        version = state.cell_version(s, c.settings.cell_name)
    c.wake_leader()
    return jsonify({**detail, "snapshot": _durable(version)})


@bp.delete("/models/<path:name>")
@require("admin_token")
def unpublish(name: str):  # type: ignore[no-untyped-def]
    c = ctx()
    with c.sessions.begin() as s:
        state.unpublish(s, c.settings, _model_id(name))
        version = state.cell_version(s, c.settings.cell_name)
    c.wake_leader()
    return jsonify({"model_id": _model_id(name), "snapshot": _durable(version)})


@bp.post("/heartbeat")
@require("cluster_token")
def heartbeat():  # type: ignore[no-untyped-def]
    """A model server's heartbeat. Under the admin's ASGI entry (asgi.py) this route is
    answered in the event loop instead; this one serves the WSGI app (tests, other servers)."""
    return jsonify(ctx().heartbeats.record(body()))


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
    out["snapshot_behind"] = out["version"] - out["snapshot_version"]
    out["leader"] = current_lease(c.engine, lease_name(c.settings))
    return jsonify(out)


@bp.post("/demand/<path:name>")
def demand(name: str):  # type: ignore[no-untyped-def]
    """A caller waits for a replica of an idle (or still loading) model: the leader loads one.
    Answers as `locate` does, with `loading` (false: waiting is pointless, `reason` says why).
    Open to data callers, as `locate` is."""
    c = ctx()
    with c.sessions.begin() as s:
        hopeless = state.note_demand(s, c.settings, _model_id(name))
    if hopeless is None:
        c.wake_leader()
    with c.sessions() as s:
        return jsonify({**state.locate(s, c.settings, _model_id(name)), "loading": hopeless is None,
                        "reason": hopeless})


@bp.get("/locate/<path:name>")
def locate(name: str):  # type: ignore[no-untyped-def]
    """Ready replica addresses. With ?version=V&timeout=T, waits until the answer's
    version differs from V (or T seconds pass) before answering."""
    c = ctx()
    known = request.args.get("version")
    try:
        timeout = float(request.args.get("timeout", 0))
    except ValueError:
        timeout = math.nan
    if not math.isfinite(timeout):  # nan would wait forever
        raise InvalidArgument("timeout must be a number of seconds")
    timeout = min(timeout, MAX_LONG_POLL_S)
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        with c.sessions() as s:
            answer = state.locate(s, c.settings, _model_id(name))
        if not known or answer["version"] != known or time.monotonic() >= deadline:
            return jsonify(answer)
        time.sleep(min(c.poll_interval_s, max(deadline - time.monotonic(), 0.0)))
