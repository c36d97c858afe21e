"""The Saxml HTTP API: JSON bodies (also on GET), `{"error": message}` with 4xx on bad input.

    GET  /                                              -> {"message": ...}
    POST /publish    {model, model_path, checkpoint, replicas[, overrides]} -> echo
    POST /unpublish  {model}                              -> {model}
    PUT|POST /update {model, model_path, checkpoint, replicas} -> echo
    GET  /listall    {sax_cell}                           -> [model ids]
    GET  /listcell   {model}     -> {model, model_path, checkpoint, max_replicas, active_replicas,
                                     min_replicas, state (READY, DEGRADED, LOADING, IDLE), reason
                                     [, last_error]}
    POST /generate   {model, query[, extra_inputs]}       -> [[text, score], ...]
    POST /score      {model, prefix, suffix[]}            -> [logp, ...]
"""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, jsonify, request

from client import errors as sax_errors
from client.admin import AdminClient
from http_frontend import auth
from http_frontend.context import check_n, exchange, frontend, json_body
from http_frontend.errors import FrontendError, from_sax_error
from http_frontend.upstream import dumps

bp = Blueprint("saxml", __name__)
MESSAGE = "HTTP Server for SAX Client"


def _body() -> dict[str, Any]:
    """The JSON body merged over the query string (GET callers may use either)."""
    return {**request.args.to_dict(), **json_body(allow_empty=True)}


def _str(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise FrontendError(400, f"'{key}' must be a non-empty string", param=key)
    return value


SCALING = ("min_replicas", "max_replicas", "idle_seconds")


def _scaling(body: dict[str, Any]) -> dict[str, Any]:
    """The autoscaling fields given (validated by the admin: min <= replicas <= max, idle > 0)."""
    out: dict[str, Any] = {}
    for key in SCALING:
        value = body.get(key)
        if value is None:
            continue
        if key == "idle_seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FrontendError(400, "'idle_seconds' must be a number of seconds", param=key)
            out[key] = value
        else:
            out[key] = _replicas(body, key=key)
    return out


def _replicas(body: dict[str, Any], *, required: bool = True, key: str = "replicas") -> int | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) < 10:
        value = int(value)  # ASCII digits only: "²".isdigit() is true, int("²") fails
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FrontendError(400, f"'{key}' must be a non-negative integer", param=key)
    return value


def _checkpoint(body: dict[str, Any], *, required: bool = True) -> str | None:
    if "checkpoint" not in body and not required:
        return None
    value = body.get("checkpoint")
    if value is None:
        return "None"
    if not isinstance(value, str) or not value:
        raise FrontendError(400, "'checkpoint' must be a path, gs:// URL or \"None\"", param="checkpoint")
    return value


def _admin_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except sax_errors.SaxError as e:
        raise from_sax_error(e) from None


def _mutator() -> AdminClient:
    """The admin client for a mutation: with the frontend's admin token, else the caller's."""
    fe = frontend()
    if fe.settings.admin_token:
        return fe.admin
    return AdminClient(fe.settings.admin, token=auth.bearer() or "", session=fe.admin.session)


def _echo(detail: dict[str, Any], scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Saxml echo of a published model (`path` as the Saxml server's example prints it),
    with the autoscaling fields the request gave."""
    return {"model": detail["model_id"], "model_path": detail["model_path"], "path": detail["model_path"],
            "checkpoint": detail["checkpoint"],
            "replicas": detail.get("requested_replicas", detail["max_replicas"]),
            **{k: detail[k] for k in scaling or () if k in detail}}


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    return jsonify({"message": MESSAGE})


@bp.post("/publish")
@auth.guarded(auth.ADMIN)
def publish():  # type: ignore[no-untyped-def]
    body = json_body()
    model, model_path = _str(body, "model"), _str(body, "model_path")
    checkpoint, replicas = _checkpoint(body), _replicas(body)
    overrides = body.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise FrontendError(400, "'overrides' must be an object of KEY: value", param="overrides")
    scaling = _scaling(body)
    detail = _admin_call(_mutator().publish, model, model_path, checkpoint, replicas, overrides, **scaling)
    exchange().model = detail["model_id"]
    out = _echo(detail, scaling)
    if overrides:
        out["overrides"] = detail.get("overrides", overrides)
    return jsonify(out)


@bp.post("/unpublish")
@auth.guarded(auth.ADMIN)
def unpublish():  # type: ignore[no-untyped-def]
    model = _str(json_body(), "model")
    _admin_call(_mutator().unpublish, model)
    return jsonify({"model": model})


@bp.route("/update", methods=["PUT", "POST"])
@auth.guarded(auth.ADMIN)
def update():  # type: ignore[no-untyped-def]
    body = json_body()
    model = _str(body, "model")
    model_path = _str(body, "model_path", required=False)
    checkpoint, replicas = _checkpoint(body, required=False), _replicas(body, required=False)
    scaling = _scaling(body)
    if checkpoint is None and replicas is None and not scaling:
        raise FrontendError(400, "an update needs 'checkpoint', 'replicas', 'min_replicas', 'max_replicas' "
                                 "and/or 'idle_seconds'", param="replicas")
    detail = _admin_call(_mutator().update, model, model_path=model_path, checkpoint=checkpoint,
                         replicas=replicas, **scaling)
    return jsonify(_echo(detail, scaling))


@bp.route("/listall", methods=["GET", "POST"])
@auth.guarded(auth.DATA)
def listall():  # type: ignore[no-untyped-def]
    cell = _str(_body(), "sax_cell")
    return jsonify(_admin_call(frontend().admin.models, cell))


@bp.route("/listcell", methods=["GET", "POST"])
@auth.guarded(auth.DATA)
def listcell():  # type: ignore[no-untyped-def]
    name = _str(_body(), "model")
    model_id = frontend().catalog.resolve(name) if not name.startswith("/") else name
    d = _admin_call(frontend().admin.model, model_id)
    out = {"model": d["model_id"], "model_path": d["model_path"], "checkpoint": d["checkpoint"],
           "max_replicas": d["max_replicas"], "active_replicas": d["active_replicas"],
           "min_replicas": d["min_replicas"], "state": d["state"], "reason": d["reason"]}
    if d.get("adapters"):  # a LoRA base: its own target, what its adapters make it, and why
        out.update(target_replicas=d["target_replicas"], effective_replicas=d["effective_replicas"],
                   adapters=d["adapters"])
        if d.get("replicas_reason"):
            out["replicas_reason"] = d["replicas_reason"]
    if d.get("last_error"):  # a failed load's reason, also when the model is placed elsewhere now
        out["last_error"] = d["last_error"]
    return jsonify(out)


def _lm_call(path: str, body: dict[str, Any], name: str) -> Any:
    """One call to a replica's Sax LM method; its refusals come back as {"error": message}."""
    fe, ex = frontend(), exchange()
    model_id = fe.catalog.resolve(name)
    fe.upstream.check_published(model_id, name)
    ex.model = model_id
    fe.upstream.admit(ex, model_id)
    resp = fe.upstream.call(ex, model_id, path, dumps({**body, "model": model_id}))
    raw = fe.upstream.read(ex, resp)
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if resp.status_code >= 400:
        message, _ = sax_errors.error_message(payload if payload is not None else raw.decode(errors="replace"))
        retry = resp.headers.get("Retry-After")
        valid = retry is not None and retry.isascii() and retry.isdigit()
        raise FrontendError(resp.status_code, message, retry_after=float(retry) if valid else None)
    if not isinstance(payload, dict):
        raise FrontendError(502, f"replica {resp.address} gave an answer that is not JSON")
    return payload


@bp.post("/generate")
@auth.guarded(auth.DATA)
def generate():  # type: ignore[no-untyped-def]
    body = json_body()
    name, query = _str(body, "model"), _str(body, "query")
    extra = body.get("extra_inputs")
    if extra is not None and not isinstance(extra, dict):
        raise FrontendError(400, "'extra_inputs' must be an object", param="extra_inputs")
    if extra:
        check_n(extra.get("num_samples"), frontend().settings.max_n, "extra_inputs.num_samples")
    payload = _lm_call("/lm/generate", {"text": query, **({"extra_inputs": extra} if extra else {})}, name)
    return jsonify(payload.get("results", []))


@bp.post("/score")
@auth.guarded(auth.DATA)
def score():  # type: ignore[no-untyped-def]
    body = json_body()
    name = _str(body, "model")
    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise FrontendError(400, "'prefix' must be a string", param="prefix")
    suffix = body.get("suffix", body.get("suffixes"))
    if isinstance(suffix, str):
        suffix = [suffix]
    if not isinstance(suffix, list) or not suffix or not all(isinstance(s, str) for s in suffix):
        raise FrontendError(400, "'suffix' must be a non-empty list of strings", param="suffix")
    payload = _lm_call("/lm/score", {"prefix": prefix, "suffixes": suffix}, name)
    return jsonify(payload.get("scores", []))
