"""Flask app factory of the model server: data API, health, readiness, metrics."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, stream_with_context
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from common.probes import vllm_probes
from common.http import hung_up, parse_json, read_body
from model_server.api import openai as openai_api
from model_server.api import params
from model_server.api import sax as sax_api
from model_server.api.errors import ApiError, from_engine_error, invalid
from model_server.engine import InvalidRequest, QueueFull
from model_server.manager import LOADED, ModelManager, ModelNotFound, ModelNotReady, ServedModel
from model_server.metrics import make_registry
from model_server.settings import RequestLimits

log = logging.getLogger(__name__)
bp = Blueprint("model_server", __name__)
MAX_BODY_BYTES = 16 << 20
EMBEDDING_KEYS = {"model", "input", "encoding_format", "user"}


def manager() -> ModelManager:
    return current_app.extensions["sax_manager"]


def limits() -> RequestLimits:
    return current_app.extensions["sax_limits"]


def json_body() -> dict[str, Any]:
    try:
        data = parse_json(read_body(request))
    except ValueError as e:
        raise invalid(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    return data


def served_for(body: dict[str, Any]) -> ServedModel:
    try:
        return manager().resolve(body.get("model"))
    except ModelNotFound as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    except ModelNotReady as e:
        raise ApiError(503, str(e), type="service_unavailable_error", code="model_not_ready",
                       retry_after=1.0) from None


def caller_watch() -> Callable[[], bool]:
    """A check that the current request's caller closed its connection, callable from any
    thread (a prompt list's per-prompt waits run outside the request context)."""
    sock = request.environ.get("gunicorn.socket")
    return lambda: hung_up(sock)


def sse_response(stream: Any) -> Response:
    return Response(stream_with_context(stream), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _openai(chat: bool) -> Response:
    """An OpenAI completion or chat call: its JSON answer, or its SSE stream."""
    body = json_body()
    payload, stream = openai_api.handle(served_for(body), body, chat=chat, limits=limits(),
                                        abandoned=caller_watch())
    return sse_response(stream) if stream is not None else jsonify(payload)


@bp.post("/v1/completions")
def completions() -> Response:
    return _openai(chat=False)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _openai(chat=True)


def _encoded(vector: list[float], encoding: str) -> Any:
    """An embedding as floats, or as OpenAI's base64 (little-endian float32; the openai SDK asks
    for it unless told otherwise)."""
    if encoding == "float":
        return vector
    import base64

    import numpy as np
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


@bp.post("/v1/embeddings")
def embeddings():  # type: ignore[no-untyped-def]
    body = json_body()
    params.check_known(body, EMBEDDING_KEYS)
    params.string(body, "user")
    served = served_for(body)
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format must be \"float\" or \"base64\"", "encoding_format")
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise invalid("'input' must be a string or a list of strings", "input")
    data = [{"object": "embedding", "index": i,
             "embedding": _encoded(sax_api.embed(served, t, limits(), "input"), encoding)}
            for i, t in enumerate(inputs)]
    tokens = sum(len(served.engine.tokenizer.encode(t)) for t in inputs)
    return jsonify({"object": "list", "data": data, "model": body["model"],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@bp.get("/v1/models")
def list_models():  # type: ignore[no-untyped-def]
    now = int(time.time())
    data = []
    for m in manager().all():
        if m.status == LOADED:
            parent = {"parent": m.overrides["base"]} if m.model_path == "lm.lora" else {}
            data.append({"id": m.model_id, "object": "model", "created": now, "owned_by": "saxplane",
                         "max_model_len": m.engine.max_seq_len, **parent})
            if m.alias:
                data.append({"id": m.alias, "object": "model", "created": now, "owned_by": "saxplane",
                             "max_model_len": m.engine.max_seq_len, "root": m.model_id, **parent})
    return jsonify({"object": "list", "data": data})


@bp.post("/lm/generate")
def lm_generate():  # type: ignore[no-untyped-def]
    body = json_body()
    return jsonify({"results": sax_api.generate(served_for(body), body, limits(), abandoned=caller_watch())})


@bp.post("/lm/generate_stream")
def lm_generate_stream():  # type: ignore[no-untyped-def]
    body = json_body()
    return sse_response(sax_api.generate_stream(served_for(body), body, limits()))


@bp.post("/lm/score")
def lm_score():  # type: ignore[no-untyped-def]
    body = json_body()
    return jsonify({"scores": sax_api.score(served_for(body), body, limits())})


@bp.post("/lm/embed")
def lm_embed():  # type: ignore[no-untyped-def]
    body = json_body()
    return jsonify({"embedding": sax_api.embed(served_for(body), body.get("text"), limits())})


@bp.post("/tokenize")
def tokenize():  # type: ignore[no-untyped-def]
    """vLLM's /tokenize: {model, prompt | messages, add_special_tokens?} -> {tokens, count, max_model_len}."""
    body = json_body()
    served = served_for(body)
    tok = served.engine.tokenizer
    add = params.boolean(body, "add_special_tokens", True)
    if "messages" in body:
        if "prompt" in body:
            raise invalid("send 'prompt' or 'messages', not both", "prompt")
        prep = openai_api.prepare_chat(served, {"model": body["model"], "messages": body["messages"]})
        ids = prep.prompts[0]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid("'prompt' must be a string", "prompt")
        ids = tok.encode(prompt, add_special_tokens=add)
    return jsonify({"tokens": ids, "count": len(ids), "max_model_len": served.engine.max_seq_len})


@bp.post("/detokenize")
def detokenize():  # type: ignore[no-untyped-def]
    body = json_body()
    served = served_for(body)
    ids = params.token_list(body.get("tokens"), "tokens", served.loaded.spec.vocab_size)
    return jsonify({"prompt": served.engine.tokenizer.decode(ids, skip_special_tokens=False)})


@bp.get("/tokenizer_info")
def tokenizer_info():  # type: ignore[no-untyped-def]
    served = served_for({"model": request.args.get("model")})
    tok = served.engine.tokenizer
    hf = tok.hf
    return jsonify({"tokenizer_class": type(hf).__name__, "vocab_size": tok.vocab_size,
                    "model_max_length": served.engine.max_seq_len, "bos_token": hf.bos_token,
                    "eos_token": hf.eos_token, "pad_token": hf.pad_token,
                    "chat_template": getattr(hf, "chat_template", None),
                    "add_bos_token": bool(getattr(hf, "add_bos_token", False))})


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok", "models": {f"{m.model_id}@{m.generation}": m.status
                                               for m in manager().all()}})


@bp.get("/models")
def models():  # type: ignore[no-untyped-def]
    return jsonify({"models": manager().report()})


@bp.get("/ready/<path:name>")
def ready(name: str):  # type: ignore[no-untyped-def]
    """200 when the model (by id or alias) has a LOADED generation here, else 503/404."""
    model = name if name.startswith("/") or "/" not in name and not name.startswith("sax") else "/" + name
    served = served_for({"model": model})
    return jsonify({"model_id": served.model_id, "generation": served.generation, "status": served.status})


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    return Response(generate_latest(current_app.extensions["sax_metrics"][0]), mimetype=CONTENT_TYPE_LATEST)


OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # vLLM's envelope on its tokenizer routes


def _error(exc: ApiError) -> Response:
    if request.path.startswith(OPENAI_PATHS):
        resp = jsonify(exc.openai_body())
    else:
        resp = jsonify({"error": exc.message, "code": exc.code, "param": exc.param})
    resp.status_code = exc.status
    resp.headers.update(exc.headers())
    return resp


def create_app(mgr: ModelManager, limits: RequestLimits = RequestLimits()) -> Flask:
    app = Flask("model_server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["sax_manager"] = mgr
    app.extensions["sax_limits"] = limits
    registry, req_counter, latency = make_registry(mgr)
    app.extensions["sax_metrics"] = (registry, req_counter, latency)
    app.register_blueprint(bp)
    app.register_blueprint(vllm_probes())

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # type: ignore[no-untyped-def]
        return _error(exc)

    @app.errorhandler(InvalidRequest)
    @app.errorhandler(QueueFull)
    def _engine_refusal(exc: Exception):  # type: ignore[no-untyped-def]
        return _error(from_engine_error(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        return _error(ApiError(exc.code or 500, exc.description or exc.name, type=kind))

    @app.errorhandler(Exception)
    def _internal(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("internal error on %s", request.path)
        return _error(ApiError(500, "internal error", type="server_error"))

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        req_counter.labels(route, str(resp.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return resp

    return app
