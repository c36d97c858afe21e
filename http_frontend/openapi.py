"""The frontend's OpenAPI 3 document: every route, its request schema, answers and errors."""
from __future__ import annotations

from typing import Any

S = dict[str, Any]


def _ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: S, required: tuple[str, ...] = (), **extra: Any) -> S:
    out: S = {"type": "object", "properties": props, **extra}
    if required:
        out["required"] = list(required)
    return out


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NONEMPTY = {"type": "string", "minLength": 1}
TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _nullable(schema: S) -> S:
    return {**schema, "nullable": True}


SAMPLING: S = {
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": _nullable({"type": "integer", "minimum": -1}),
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": 128}),
    "seed": _nullable(INT),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0.01, "maximum": 10}),
    "logit_bias": _nullable({"type": "object", "additionalProperties": {"type": "number", "minimum": -100,
                                                                        "maximum": 100}}),
    "stop": _nullable({"oneOf": [STR, {"type": "array", "items": NONEMPTY, "maxItems": 4}]}),
    "stop_token_ids": _nullable(TOKENS),
    "ignore_eos": _nullable(BOOL),
    "stream": _nullable(BOOL),
    "stream_options": _nullable(_obj({"include_usage": BOOL})),
    "user": STR,
}

USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})

SCHEMAS: S = {
    "SaxError": _obj({"error": STR}, ("error",)),
    "OpenAIError": _obj({"error": _obj({"message": STR, "type": STR, "param": _nullable(STR),
                                        "code": _nullable(STR)}, ("message", "type"))}, ("error",)),
    "Message": _obj({"message": STR}, ("message",)),
    "PublishRequest": _obj({"model": NONEMPTY, "model_path": NONEMPTY, "checkpoint": _nullable(STR),
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 1024},
                            "overrides": {"type": "object"}}, ("model", "model_path", "checkpoint", "replicas")),
    "ModelEcho": _obj({"model": STR, "model_path": STR, "path": STR, "checkpoint": STR, "replicas": INT,
                       "overrides": {"type": "object"}}, ("model", "model_path", "checkpoint", "replicas")),
    "UnpublishRequest": _obj({"model": NONEMPTY}, ("model",)),
    "UpdateRequest": _obj({"model": NONEMPTY, "model_path": NONEMPTY, "checkpoint": _nullable(STR),
                           "replicas": {"type": "integer", "minimum": 0, "maximum": 1024}}, ("model",)),
    "ListCell": _obj({"model": STR, "model_path": STR, "checkpoint": STR, "max_replicas": INT,
                      "active_replicas": INT},
                     ("model", "model_path", "checkpoint", "max_replicas", "active_replicas")),
    "GenerateRequest": _obj({"model": NONEMPTY, "query": NONEMPTY, "extra_inputs": _obj({
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "per_example_max_decode_steps": {"type": "integer", "minimum": 1},
        "per_example_top_k": {"type": "integer", "minimum": 0},
        "per_example_top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "num_samples": {"type": "integer", "minimum": 1, "maximum": 128},
        "seed": INT}, additionalProperties=False)}, ("model", "query")),
    "GenerateResponse": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                    "items": {"oneOf": [STR, NUM]}}},
    "ScoreRequest": _obj({"model": NONEMPTY, "prefix": STR,
                          "suffix": {"type": "array", "items": NONEMPTY, "minItems": 1, "maxItems": 128}},
                         ("model", "suffix")),
    "ScoreResponse": {"type": "array", "items": NUM},
    "CompletionRequest": _obj({
        "model": NONEMPTY,
        "prompt": {"oneOf": [STR, {"type": "array", "items": STR, "minItems": 1},
                             {**TOKENS, "minItems": 1},
                             {"type": "array", "items": {**TOKENS, "minItems": 1}, "minItems": 1}]},
        "max_tokens": _nullable({"type": "integer", "minimum": 0}),
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
        "echo": _nullable(BOOL), "best_of": _nullable(INT), **SAMPLING}, ("model", "prompt")),
    "Completion": _obj({"id": STR, "object": {"type": "string", "enum": ["text_completion"]}, "created": INT,
                        "model": STR, "usage": USAGE, "choices": {"type": "array", "items": _obj({
                            "index": INT, "text": STR, "finish_reason": _nullable(STR),
                            "logprobs": _nullable(_obj({"tokens": {"type": "array", "items": STR},
                                                        "token_logprobs": {"type": "array"},
                                                        "top_logprobs": {"type": "array"},
                                                        "text_offset": {"type": "array", "items": INT}}))})}},
                       ("id", "object", "created", "model", "choices")),
    "ChatMessage": _obj({"role": {"type": "string", "enum": ["system", "developer", "user", "assistant",
                                                             "tool"]},
                         "content": _nullable({"oneOf": [STR, {"type": "array", "items": _obj(
                             {"type": {"type": "string", "enum": ["text"]}, "text": STR}, ("type", "text"))}]}),
                         "name": STR}, ("role",)),
    "ChatCompletionRequest": _obj({
        "model": NONEMPTY,
        "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        "logprobs": _nullable(BOOL), "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
        "response_format": _nullable(_obj({"type": {"type": "string", "enum": ["text"]}})),
        **SAMPLING}, ("model", "messages")),
    "ChatCompletion": _obj({"id": STR, "object": {"type": "string", "enum": ["chat.completion"]},
                            "created": INT, "model": STR, "usage": USAGE,
                            "choices": {"type": "array", "items": _obj({
                                "index": INT, "finish_reason": _nullable(STR),
                                "message": _obj({"role": STR, "content": _nullable(STR)}),
                                "logprobs": _nullable({"type": "object"})})}},
                           ("id", "object", "created", "model", "choices")),
    "EmbeddingRequest": _obj({"model": NONEMPTY,
                              "input": {"oneOf": [NONEMPTY, {"type": "array", "items": NONEMPTY, "minItems": 1}]},
                              "encoding_format": {"type": "string", "enum": ["float"]}, "user": STR},
                             ("model", "input")),
    "Embeddings": _obj({"object": STR, "model": STR, "usage": _obj({"prompt_tokens": INT, "total_tokens": INT}),
                        "data": {"type": "array", "items": _obj({"object": STR, "index": INT,
                                                                 "embedding": {"type": "array", "items": NUM}})}},
                       ("object", "data", "model")),
    "ModelList": _obj({"object": STR, "data": {"type": "array", "items": _ref("Model")}}, ("object", "data")),
    "Model": _obj({"id": STR, "object": STR, "created": INT, "owned_by": STR, "root": STR},
                  ("id", "object", "created", "owned_by")),
    "TokenizeRequest": _obj({"model": NONEMPTY, "prompt": STR, "messages": {"type": "array",
                                                                           "items": _ref("ChatMessage")},
                             "add_special_tokens": BOOL}),
    "Tokens": _obj({"tokens": TOKENS, "count": INT, "max_model_len": INT}, ("tokens",)),
    "DetokenizeRequest": _obj({"model": NONEMPTY, "tokens": TOKENS}, ("tokens",)),
    "Detokenized": _obj({"prompt": STR}, ("prompt",)),
    "TokenizerInfo": {"type": "object"},
    "Health": _obj({"status": STR, "admin": STR}, ("status",)),
}


def _json(schema: S) -> S:
    return {"application/json": {"schema": schema}}


def _errors(kind: str, codes: tuple[int, ...]) -> S:
    text = {400: "Invalid request", 401: "Missing or wrong API key", 403: "Key not allowed here",
            404: "Unknown model", 409: "Already published", 413: "Body too large",
            429: "Too many requests in flight for this model (see Retry-After)",
            503: "No ready replica (see Retry-After)", 504: "Upstream timeout"}
    return {str(c): {"description": text[c], "content": _json(_ref(kind))} for c in codes}


DATA_ERRORS = (400, 401, 404, 413, 429, 503, 504)
BEARER = [{"bearer": []}, {}]


def _op(summary: str, *, body: str | None = None, answer: S | None = None, errors: str = "OpenAIError",
        codes: tuple[int, ...] = DATA_ERRORS, stream: bool = False, security: Any = BEARER,
        params: list[S] | None = None, op_id: str = "") -> S:
    ok: S = {"description": "OK"}
    if answer is not None:
        ok["content"] = _json(answer)
        if stream:
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    op: S = {"summary": summary, "operationId": op_id, "responses": {"200": ok, **_errors(errors, codes)}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if security is not None:
        op["security"] = security
    if params:
        op["parameters"] = params
    return op


def _query(name: str, required: bool) -> S:
    return {"name": name, "in": "query", "required": required, "schema": NONEMPTY}


def document(server_url: str = "") -> S:
    sax_codes = (400, 401, 404, 413, 429, 503, 504)
    admin_codes = (400, 401, 403, 404, 409, 413)
    paths: S = {
        "/": {"get": _op("Frontend banner", answer=_ref("Message"), codes=(), security=None, op_id="index")},
        "/publish": {"post": _op("Publish a model", body="PublishRequest", answer=_ref("ModelEcho"),
                                 errors="SaxError", codes=admin_codes, op_id="publish")},
        "/unpublish": {"post": _op("Unpublish a model", body="UnpublishRequest", answer=_ref("UnpublishRequest"),
                                   errors="SaxError", codes=admin_codes, op_id="unpublish")},
        "/update": {m: _op("Change a model's checkpoint and/or replicas", body="UpdateRequest",
                           answer=_ref("ModelEcho"), errors="SaxError", codes=admin_codes, op_id=f"update_{m}")
                    for m in ("put", "post")},
        "/listall": {"get": _op("Model ids of a cell (also as a JSON body {sax_cell})",
                                answer={"type": "array", "items": STR}, errors="SaxError",
                                codes=(400, 401, 503), params=[_query("sax_cell", True)], op_id="listall")},
        "/listcell": {"get": _op("One model's state (also as a JSON body {model})", answer=_ref("ListCell"),
                                 errors="SaxError", codes=(400, 401, 404, 503), params=[_query("model", True)],
                                 op_id="listcell")},
        "/generate": {"post": _op("Generate (Saxml LM.Generate)", body="GenerateRequest",
                                  answer=_ref("GenerateResponse"), errors="SaxError", codes=sax_codes,
                                  op_id="generate")},
        "/score": {"post": _op("Score suffixes after a prefix (Saxml LM.Score)", body="ScoreRequest",
                               answer=_ref("ScoreResponse"), errors="SaxError", codes=sax_codes,
                               op_id="score")},
        "/v1/models": {"get": _op("Models with a ready replica, and their aliases", answer=_ref("ModelList"),
                                  codes=(401, 503), op_id="list_models")},
        "/v1/models/{model}": {"get": _op("One listed model (a Sax id without its leading slash, or an alias)",
                                          answer=_ref("Model"), codes=(401, 404, 503), op_id="retrieve_model",
                                          params=[{"name": "model", "in": "path", "required": True,
                                                   "schema": NONEMPTY}])},
        "/v1/completions": {"post": _op("Completions (prompt lists fan out across replicas)",
                                        body="CompletionRequest", answer=_ref("Completion"), stream=True,
                                        op_id="completions")},
        "/v1/chat/completions": {"post": _op("Chat completions", body="ChatCompletionRequest",
                                             answer=_ref("ChatCompletion"), stream=True, op_id="chat")},
        "/v1/embeddings": {"post": _op("Embeddings", body="EmbeddingRequest", answer=_ref("Embeddings"),
                                       op_id="embeddings")},
        "/tokenize": {"post": _op("Tokenize (vLLM); model defaults to the only ready one",
                                  body="TokenizeRequest", answer=_ref("Tokens"), op_id="tokenize")},
        "/detokenize": {"post": _op("Detokenize (vLLM)", body="DetokenizeRequest", answer=_ref("Detokenized"),
                                    op_id="detokenize")},
        "/tokenizer_info": {"get": _op("Tokenizer description (vLLM)", answer=_ref("TokenizerInfo"),
                                       params=[_query("model", False)], op_id="tokenizer_info")},
        "/healthz": {"get": _op("Liveness", answer=_ref("Health"), codes=(), security=None, op_id="healthz")},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {"200": {"description": "OK", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                  "responses": {"200": {"description": "OK", "content": _json(
                                      {"type": "object"})}}}},
    }
    doc: S = {
        "openapi": "3.0.3",
        "info": {"title": "Saxplane HTTP frontend", "version": "0.1.0",
                 "description": "Saxml HTTP API and OpenAI-compatible API over a Saxplane cell."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
