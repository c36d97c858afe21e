"""`POST /heartbeat` as plain WSGI in front of the Flask app.

Every model server calls it every interval (1,000 servers: 1,000 calls a second),
and most answers are `unchanged` from memory (heartbeats.py). Flask's request
context, routing, JSON helpers and error handlers cost more than that answer
does, so this middleware serves the one route itself, with the same token check
and the same error shape as the Flask routes; everything else passes through.
"""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Callable, Iterable

from werkzeug.exceptions import RequestEntityTooLarge

from admin_server.api import check_token, describe_error
from admin_server.heartbeats import HeartbeatRecorder
from admin_server.naming import InvalidArgument
from admin_server.serving import parse_json
from admin_server.settings import MAX_BODY_BYTES, AdminSettings


class HeartbeatRoute:
    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], recorder: HeartbeatRecorder,
                 settings: AdminSettings) -> None:
        self.wsgi_app, self.recorder, self.settings = wsgi_app, recorder, settings

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/heartbeat":
            return self.wsgi_app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            status, answer = 405, _error("METHOD_NOT_ALLOWED", "heartbeats are POSTed")
        else:
            status, answer = self._handle(environ)
        data = json.dumps(answer, separators=(",", ":")).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def _handle(self, environ: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            check_token(self.settings.cluster_token, environ.get("HTTP_AUTHORIZATION", ""),
                        other=self.settings.admin_token)
            return 200, self.recorder.record(_json_body(environ))
        except Exception as exc:  # noqa: BLE001 - every failure answers in the API's error shape
            status, code, message = describe_error(exc)
            return status, _error(code, message)


def _json_body(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise InvalidArgument("bad Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    try:
        data = parse_json(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        raise InvalidArgument("request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
