"""The OpenAI API (/v1/models, completions, chat, embeddings) and vLLM's tokenizer routes.

Single-prompt calls pass the request body and the replica's answer (JSON or SSE)
through unchanged; prompt lists fan out (see fanout.py).
"""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from http_frontend import auth, fanout
from http_frontend.context import Frontend, check_n, exchange, frontend, json_body
from http_frontend.errors import FrontendError
from http_frontend.exchange import Exchange
from http_frontend.upstream import body_response, dumps, stream_response

bp = Blueprint("openai", __name__)


def _resolve(body: dict[str, Any]) -> tuple[str, tuple[str, str] | None]:
    """(model id, rename) for the request's `model`. With a frontend alias the body is rewritten
    to the model id (replicas do not know that alias) and `rename` puts the name back."""
    fe, ex = frontend(), exchange()
    name = body.get("model")
    model_id = fe.catalog.resolve(name)
    fe.upstream.check_published(model_id, name)
    ex.model = model_id
    if name in fe.catalog.aliases:
        body["model"] = model_id
        return model_id, (model_id, name)
    return model_id, None


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FrontendError(400, f"'{key}' must be a boolean, got {value!r}", param=key)
    return value


def admit_stream(fe: Frontend, ex: Exchange) -> None:
    """Counts an open stream against the caller's key until the exchange ends (the last byte
    written or the caller gone); 429 past --max-streams-per-key."""
    limit = fe.settings.max_streams_per_key
    if limit <= 0:
        return
    key = auth.caller(fe.settings)
    if not fe.streams.try_acquire(key):
        raise FrontendError(429, f"this API key has {limit} streams open, the most allowed at once; "
                                 "retry when one ends", code="too_many_streams", retry_after=1.0)
    ex.on_finish(lambda: fe.streams.release(key))


def _proxy(path: str, *, fan_key: str | None = None, streams: bool = True) -> Response:
    fe, ex = frontend(), exchange()
    body = json_body()
    model_id, rename = _resolve(body)
    stream = _flag(body, "stream") if streams else False
    if streams:
        check_n(body.get("n"), fe.settings.max_n)
    if stream:
        admit_stream(fe, ex)
    items = fanout.split(body, fan_key) if fan_key else None
    fe.upstream.admit(ex, model_id, len(items) if items else 1)
    if items:
        if fan_key == "input":
            return fe.fanout.whole(ex, model_id, path, body, "input", items, fanout.merge_embeddings, rename)
        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if stream:
            return fe.fanout.stream(ex, model_id, path, body, items, n, rename)
        return fe.fanout.whole(ex, model_id, path, body, "prompt", items, fanout.merge_completions(n), rename)
    data = dumps(body) if rename else request.get_data(cache=True)
    resp = fe.upstream.call(ex, model_id, path, data)
    return stream_response(ex, fe.upstream, resp, rename) if stream else body_response(ex, fe.upstream, resp, rename)


@bp.post("/v1/completions")
@auth.guarded(auth.DATA)
def completions():  # type: ignore[no-untyped-def]
    return _proxy("/v1/completions", fan_key="prompt")


@bp.post("/v1/chat/completions")
@auth.guarded(auth.DATA)
def chat_completions():  # type: ignore[no-untyped-def]
    return _proxy("/v1/chat/completions")


@bp.post("/v1/embeddings")
@auth.guarded(auth.DATA)
def embeddings():  # type: ignore[no-untyped-def]
    return _proxy("/v1/embeddings", fan_key="input", streams=False)


@bp.get("/v1/models")
@auth.guarded(auth.DATA)
def models():  # type: ignore[no-untyped-def]
    """Every published model: an idle one (scaled to zero) is loaded by its next call;
    `loaded` says whether a replica is ready now."""
    created = int(time.time())
    catalog = frontend().catalog
    data = [{"id": name, "object": "model", "created": created, "owned_by": "saxplane",
             **({"root": model_id} if name != model_id else {}), **_parent(catalog, model_id), "loaded": loaded}
            for name, model_id, loaded in catalog.callable()]
    return jsonify({"object": "list", "data": data})


def _parent(catalog: Any, model_id: str) -> dict[str, str]:
    """{"parent": base id} for a LoRA adapter (as vLLM lists adapters), else {}."""
    base = catalog.parent(model_id)
    return {"parent": base} if base else {}


@bp.get("/v1/models/<path:name>")
@auth.guarded(auth.DATA)
def model(name: str):  # type: ignore[no-untyped-def]
    for n, model_id, loaded in frontend().catalog.callable():
        if n == name or n == "/" + name:
            return jsonify({"id": n, "object": "model", "created": int(time.time()), "owned_by": "saxplane",
                            **({"root": model_id} if n != model_id else {}),
                            **_parent(frontend().catalog, model_id), "loaded": loaded})
    raise FrontendError(404, f"The model `{name}` does not exist or is not published.", param="model",
                        code="model_not_found")


def _tokenizer_model(name: Any) -> str:
    """The model a tokenizer call is for: the one it names, else the default one."""
    fe, ex = frontend(), exchange()
    model_id = fe.catalog.resolve(name) if name is not None else fe.catalog.default_model(
        fe.settings.default_model)
    fe.upstream.check_published(model_id, name or model_id)
    ex.model = model_id
    return model_id


def _tokenizer_call(path: str) -> Response:
    fe, ex = frontend(), exchange()
    body = json_body()
    body["model"] = _tokenizer_model(body.get("model"))
    fe.upstream.admit(ex, body["model"])
    return body_response(ex, fe.upstream, fe.upstream.call(ex, body["model"], path, dumps(body)), None)


@bp.post("/tokenize")
@auth.guarded(auth.DATA)
def tokenize():  # type: ignore[no-untyped-def]
    return _tokenizer_call("/tokenize")


@bp.post("/detokenize")
@auth.guarded(auth.DATA)
def detokenize():  # type: ignore[no-untyped-def]
    return _tokenizer_call("/detokenize")


@bp.get("/tokenizer_info")
@auth.guarded(auth.DATA)
def tokenizer_info():  # type: ignore[no-untyped-def]
    fe, ex = frontend(), exchange()
    model_id = _tokenizer_model(request.args.get("model"))
    status, body, ctype = fe.upstream.get(ex, model_id, "/tokenizer_info", {"model": model_id})
    ex.first_byte()
    return Response(body, status=status, content_type=ctype)
