"""Flask app factory of the HTTP frontend: Saxml routes, OpenAI routes, health, metrics, OpenAPI."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from common.probes import vllm_probes
from client.admin import AdminClient
from client.router import Router
from http_frontend import openai_routes, saxml_routes
from http_frontend.admission import Admission
from http_frontend.catalog import Catalog
from http_frontend.context import Frontend, frontend
from http_frontend.errors import FrontendError
from http_frontend.exchange import Exchange, request_id
from http_frontend.fanout import FanOut
from http_frontend.metrics import FrontendMetrics
from http_frontend.openapi import document
from http_frontend.settings import FrontendSettings
from http_frontend.transport import FrontendTransport
from http_frontend.upstream import Upstream

log = logging.getLogger(__name__)
OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
CORS_HEADERS = "Authorization, Content-Type, X-Request-Id"
HEALTH_CACHE_S = 2.0


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def build_frontend(settings: FrontendSettings, admission: Admission | None = None,
                   streams: Admission | None = None) -> Frontend:
    admin = AdminClient(settings.admin, token=settings.admin_token or "", timeout_s=10.0)
    pool_size = settings.threads + settings.fanout_threads
    router = Router(AdminClient(settings.admin, token="", timeout_s=10.0), transport=FrontendTransport(pool_size),
                    max_attempts=settings.max_attempts, load_wait_s=settings.load_wait_s)
    metrics = FrontendMetrics()
    admission = admission or Admission(settings.max_outstanding_per_model)
    upstream = Upstream(router, metrics, admission, settings.upstream_timeout_s)
    pool = ThreadPoolExecutor(max_workers=settings.fanout_threads, thread_name_prefix="sax-fanout")
    return Frontend(settings=settings, admin=admin, router=router,
                    catalog=Catalog(admin, settings.alias_map, settings.models_cache_s), metrics=metrics,
                    admission=admission, upstream=upstream, fanout=FanOut(upstream, pool), pool=pool,
                    streams=streams or Admission(settings.max_streams_per_key))


def _error_response(exc: FrontendError) -> Response:
    resp = jsonify(exc.openai_body() if is_openai_path(request.path) else exc.sax_body())
    resp.status_code = exc.status
    resp.headers.update(exc.headers())
    return resp


def _cors(resp: Response, settings: FrontendSettings) -> None:
    origin = request.headers.get("Origin")
    if not settings.allowed_origins or not origin:
        return
    if "*" in settings.allowed_origins or origin in settings.allowed_origins:
        resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in settings.allowed_origins else origin
        resp.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        resp.headers.add("Vary", "Origin")


def create_app(settings: FrontendSettings, admission: Admission | None = None,
               streams: Admission | None = None) -> Flask:
    """One frontend worker. `admission` (outstanding calls per model) and `streams` (open streams
    per API key) are shared across workers when the master made them."""
    app = Flask("http_frontend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    fe = build_frontend(settings, admission, streams)
    app.extensions["sax_frontend"] = fe
    app.register_blueprint(saxml_routes.bp)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(vllm_probes())
    admin_health: dict[str, Any] = {"at": 0.0, "status": "unknown"}
    health_lock = threading.Lock()

    @app.before_request
    def _start() -> Response | None:
        ex = Exchange(request_id(request.headers.get("X-Request-Id")), request.method, request.path, fe.metrics)
        ex.route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        ex.caller = request.environ.get("gunicorn.socket")
        g.exchange = ex
        if settings.allowed_origins and request.method == "OPTIONS" and \
                request.headers.get("Access-Control-Request-Method"):
            resp = Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = \
                request.headers.get("Access-Control-Request-Headers") or CORS_HEADERS
            resp.headers["Access-Control-Max-Age"] = "600"
            return resp
        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            raise FrontendError(413, f"request body of {request.content_length} bytes is over the limit of "
                                     f"{settings.max_body_bytes} bytes", code="request_too_large")
        return None

    @app.after_request
    def _finish(resp: Response) -> Response:
        ex: Exchange = g.exchange
        resp.headers["X-Request-Id"] = ex.rid
        _cors(resp, settings)
        ex.status = resp.status_code
        resp.call_on_close(ex.finish)  # when the WSGI server is done with the body (streams included)
        g.finish_registered = True
        return resp

    @app.teardown_request
    def _teardown(exc: BaseException | None) -> None:
        ex = g.get("exchange")
        if ex is not None and not g.get("finish_registered"):
            ex.finish(500)

    @app.errorhandler(FrontendError)
    def _frontend_error(exc: FrontendError):  # type: ignore[no-untyped-def]
        if "exchange" in g:
            g.exchange.error_kind = exc.kind
        return _error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is over the limit of {settings.max_body_bytes} bytes"
        return _frontend_error(FrontendError(status, message, code=code))

    @app.errorhandler(Exception)
    def _internal(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("internal error on %s %s (request %s)", request.method, request.path,
                      g.exchange.rid if "exchange" in g else "-")
        return _frontend_error(FrontendError(500, "internal error", code="internal_error"))

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        """Alive; `admin` tells whether the admin answered lately (routing goes on from cache if not)."""
        with health_lock:
            if time.monotonic() - admin_health["at"] > HEALTH_CACHE_S:
                try:
                    fe.admin.healthz()
                    admin_health["status"] = "ok"
                except Exception:
                    admin_health["status"] = "unreachable"
                admin_health["at"] = time.monotonic()
        return jsonify({"status": "ok", "admin": admin_health["status"]})

    @app.get("/metrics")
    def metrics():  # type: ignore[no-untyped-def]
        return Response(frontend().metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    def openapi():  # type: ignore[no-untyped-def]
        return jsonify(document(request.host_url.rstrip("/"), settings.max_n))

    return app
