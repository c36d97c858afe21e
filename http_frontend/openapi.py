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
NAME = "[a-z]+[a-z0-9_-]*"
MODEL_ID = {"type": "string", "pattern": f"^/sax/{NAME}/{NAME}$"}
MODEL_PATH = {"type": "string", "pattern": "^[a-zA-Z]+[a-zA-Z0-9_.-]*$"}
REPLICAS = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1024},
                      {"type": "string", "pattern": "^[0-9]{1,4}$"}]}   # Saxml clients send "2" too
CHECKPOINT = {"type": "string", "minLength": 1, "nullable": True,
              "description": "A path, a gs:// URL, or \"None\" (random weights); no '..' segments"}


def _nullable(schema: S) -> S:
    return {**schema, "nullable": True}


def _json_or_text(schema: S) -> S:
    """An override value: JSON, or JSON text (Saxml's overrides are strings)."""
    return {"anyOf": [schema, STR]}


def _sampling(max_n: int) -> S:
    return {
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "maximum": 1 << 20}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": max_n}),
        "seed": _nullable({"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 64) - 1}),
        "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "repetition_penalty": _nullable({"type": "number", "minimum": 0.01, "maximum": 10}),
        "logit_bias": _nullable({"type": "object", "description": "token id (as a string) -> bias",
                                 "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
        "stop": _nullable({"oneOf": [NONEMPTY, {"type": "array", "items": NONEMPTY, "maxItems": 4}]}),
        "stop_token_ids": _nullable(TOKENS),
        "ignore_eos": _nullable(BOOL),
        "prefix_caching": _nullable(dict(BOOL, description="false: this prompt neither reuses nor offers "
                                          "cached KV blocks (on by default)")),
        "stream": _nullable(BOOL),
        "stream_options": _nullable(_obj({"include_usage": BOOL, "continuous_usage_stats": BOOL},
                                         additionalProperties=False)),
        "user": _nullable(STR),
        **STRUCTURED,
    }


JSON_SCHEMA = {"type": "object", "description": "a JSON Schema"}
RESPONSE_FORMAT = _nullable({"oneOf": [
    _obj({"type": {"type": "string", "enum": ["text", "json_object"]}}, ("type",), additionalProperties=False),
    _obj({"type": {"type": "string", "enum": ["json_schema"]},
          "json_schema": _obj({"name": STR, "description": STR, "schema": JSON_SCHEMA, "strict": _nullable(BOOL)},
                              ("name",))}, ("type", "json_schema"), additionalProperties=False)]})
#: Output constraints (the reply matches them by construction): OpenAI's and vLLM's spellings.
STRUCTURED = {
    "response_format": RESPONSE_FORMAT,
    "guided_json": _nullable({"oneOf": [JSON_SCHEMA, STR]}),
    "guided_regex": _nullable(NONEMPTY),
    "guided_choice": _nullable({"type": "array", "items": NONEMPTY, "minItems": 1}),
    "guided_grammar": _nullable({**NONEMPTY, "description": "a Lark grammar"}),
    "structured_outputs": _nullable(_obj({"json": {"oneOf": [JSON_SCHEMA, STR]}, "regex": NONEMPTY,
                                          "choice": {"type": "array", "items": NONEMPTY, "minItems": 1},
                                          "grammar": NONEMPTY, "json_object": BOOL}, additionalProperties=False)),
}
TOOLS = {
    "tools": _nullable({"type": "array", "items": _obj({
        "type": {"type": "string", "enum": ["function"]},
        "function": _obj({"name": {"type": "string", "pattern": "^[a-zA-Z0-9_.-]{1,64}$"}, "description": STR,
                          "parameters": JSON_SCHEMA, "strict": _nullable(BOOL)}, ("name",))},
        ("type", "function"))}),
    "tool_choice": _nullable({"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _obj({
        "type": {"type": "string", "enum": ["function"]}, "function": _obj({"name": STR}, ("name",))},
        ("type", "function"))]}),
    "parallel_tool_calls": _nullable(BOOL),
}
TOOL_CALL = _obj({"id": STR, "type": {"type": "string", "enum": ["function"]},
                  "function": _obj({"name": STR, "arguments": STR}, ("name", "arguments"))},
                 ("id", "type", "function"))
#: A tool call in a request's history: what the model server checks (arguments as a JSON string
#: or an object; id and type optional, as several SDKs send them).
HISTORY_TOOL_CALL = _obj({"id": _nullable(STR), "type": {"type": "string", "enum": ["function"]},
                          "function": _obj({"name": STR, "arguments": {"oneOf": [STR, {"type": "object"}]}},
                                           ("name",))},
                         ("function",))

USAGE = _obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT},
             ("prompt_tokens", "completion_tokens", "total_tokens"))
FINISH = _nullable({"type": "string", "enum": ["stop", "length", "tool_calls"]})
OVERRIDES = _obj({
    "num_slots": _json_or_text({"type": "integer", "minimum": 1, "maximum": 4096}),
    "max_seq_len": _json_or_text({"type": "integer", "minimum": 1, "maximum": 1 << 20}),
    "prefill_buckets": _json_or_text({"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1}),
    "dtype": {"type": "string", "enum": ["float32", "bfloat16"]},
    "max_queue": _json_or_text({"type": "integer", "minimum": 0, "maximum": 1 << 20}),
    "ram": _json_or_text({"type": "integer", "minimum": 0}),
    "chip": {"anyOf": [NONEMPTY, {"type": "array", "items": NONEMPTY}]},
    "constraints": _json_or_text({"type": "array", "items": NONEMPTY}),
    "alias": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"},
    "max_loras": _json_or_text({"type": "integer", "minimum": 0, "maximum": 256}),
    "max_lora_rank": _json_or_text({"type": "integer", "minimum": 1, "maximum": 1024}),
    "base": {"type": "string", "pattern": "^/sax/[a-z]+[a-z0-9-_]*/[a-z]+[a-z0-9-_]*$"},
}, additionalProperties=False)


# min_replicas <= replicas <= max_replicas (both default to replicas); idle_seconds default 300.
SCALING: S = {"min_replicas": {"type": "integer", "minimum": 0}, "max_replicas": {"type": "integer", "minimum": 0},
              "idle_seconds": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}


def _schemas(max_n: int) -> S:
    sampling = _sampling(max_n)
    return {
        "SaxError": _obj({"error": STR}, ("error",)),
        "OpenAIError": _obj({"error": _obj({"message": STR, "type": STR, "param": _nullable(STR),
                                            "code": _nullable(STR)}, ("message", "type", "param", "code"))},
                            ("error",)),
        "Message": _obj({"message": STR}, ("message",)),
        "PublishRequest": _obj({"model": MODEL_ID, "model_path": MODEL_PATH, "checkpoint": CHECKPOINT,
                                "replicas": REPLICAS, "overrides": OVERRIDES, **SCALING},
                               ("model", "model_path", "replicas")),
        "ModelEcho": _obj({"model": STR, "model_path": STR, "path": STR, "checkpoint": STR, "replicas": INT,
                           "overrides": {"type": "object"}, **SCALING}, ("model", "model_path", "checkpoint", "replicas")),
        "UnpublishRequest": _obj({"model": MODEL_ID}, ("model",)),
        "UpdateRequest": _obj({"model": MODEL_ID, "model_path": MODEL_PATH, "checkpoint": CHECKPOINT,
                               "replicas": REPLICAS, **SCALING}, ("model",),
                              description="needs checkpoint, replicas and/or an autoscaling field; "
                                          "model_path must not change"),
        "ListCell": _obj({"model": STR, "model_path": STR, "checkpoint": STR, "max_replicas": INT,
                          "active_replicas": INT, "min_replicas": INT,
                          "state": {"type": "string", "enum": ["READY", "DEGRADED", "LOADING", "IDLE"]},
                          "reason": _nullable(STR), "last_error": STR,
                          # a LoRA base: its own target, the count its adapters make it, and why
                          "target_replicas": INT, "effective_replicas": INT,
                          "adapters": {"type": "object", "additionalProperties": INT}, "replicas_reason": STR},
                         ("model", "model_path", "checkpoint", "max_replicas", "active_replicas")),
        "GenerateRequest": _obj({"model": NONEMPTY, "query": NONEMPTY, "extra_inputs": _nullable(_obj({
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "per_example_max_decode_steps": {"type": "number", "minimum": 1},
            "per_example_top_k": NUM,
            "per_example_top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
            "num_samples": {"type": "number", "minimum": 1, "maximum": max_n},
            "seed": NUM}, additionalProperties=False))},
            ("model", "query")),
        "GenerateResponse": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                        "items": {"oneOf": [STR, NUM]}}},
        "ScoreRequest": _obj({"model": NONEMPTY, "prefix": STR,
                              "suffix": {"oneOf": [NONEMPTY, {"type": "array", "items": NONEMPTY, "minItems": 1,
                                                              "maxItems": 128}]}},
                             ("model", "suffix")),
        "ScoreResponse": {"type": "array", "items": NUM},
        "CompletionRequest": _obj({
            "model": NONEMPTY,
            "prompt": {"oneOf": [NONEMPTY, {"type": "array", "items": NONEMPTY, "minItems": 1, "maxItems": 1024},
                                 {**TOKENS, "minItems": 1},
                                 {"type": "array", "items": {**TOKENS, "minItems": 1}, "minItems": 1,
                                  "maxItems": 1024}]},
            "max_tokens": _nullable({"type": "integer", "minimum": 0, "maximum": 1 << 24}),
            "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
            "echo": _nullable(BOOL), "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": max_n}),
            **sampling}, ("model", "prompt"), additionalProperties=False,
            description="Unknown fields are refused (400), as OpenAI does"),
        "Completion": _obj({"id": STR, "object": {"type": "string", "enum": ["text_completion"]}, "created": INT,
                            "model": STR, "usage": USAGE, "choices": {"type": "array", "items": _obj({
                                "index": INT, "text": STR, "finish_reason": FINISH,
                                "logprobs": _nullable(_obj({"tokens": {"type": "array", "items": STR},
                                                            "token_logprobs": {"type": "array"},
                                                            "top_logprobs": {"type": "array"},
                                                            "text_offset": {"type": "array", "items": INT}}))},
                                ("index", "text", "finish_reason", "logprobs"))}},
                           ("id", "object", "created", "model", "choices", "usage")),
        "ChatMessage": _obj({"role": {"type": "string", "enum": ["system", "developer", "user", "assistant",
                                                                 "tool"]},
                             "content": _nullable({"oneOf": [STR, {"type": "array", "items": _obj(
                                 {"type": {"type": "string", "enum": ["text"]}, "text": STR},
                                 ("type", "text"))}]}),
                             "name": STR, "tool_calls": _nullable({"type": "array", "items": HISTORY_TOOL_CALL}),
                             "tool_call_id": STR}, ("role",)),
        "ChatCompletionRequest": _obj({
            "model": NONEMPTY,
            "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
            "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": 1 << 24}),
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": 1 << 24}),
            "logprobs": _nullable(BOOL),
            "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
            **TOOLS, **sampling}, ("model", "messages"), additionalProperties=False,
            description="Unknown fields are refused (400), as OpenAI does"),
        "ChatCompletion": _obj({"id": STR, "object": {"type": "string", "enum": ["chat.completion"]},
                                "created": INT, "model": STR, "usage": USAGE,
                                "choices": {"type": "array", "items": _obj({
                                    "index": INT, "finish_reason": FINISH,
                                    "message": _obj({"role": {"type": "string", "enum": ["assistant"]},
                                                     "content": _nullable(STR),
                                                     "tool_calls": {"type": "array", "items": TOOL_CALL}},
                                                    ("role", "content")),
                                    "logprobs": _nullable(_obj({"content": {"type": "array"}}, ("content",)))},
                                    ("index", "finish_reason", "message", "logprobs"))}},
                               ("id", "object", "created", "model", "choices", "usage")),
        "EmbeddingRequest": _obj({"model": NONEMPTY,
                                  "input": {"oneOf": [NONEMPTY, {"type": "array", "items": NONEMPTY, "minItems": 1,
                                                                 "maxItems": 1024}]},
                                  "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                                  "user": _nullable(STR)},
                                 ("model", "input"), additionalProperties=False),
        "Embeddings": _obj({"object": STR, "model": STR,
                            "usage": _obj({"prompt_tokens": INT, "total_tokens": INT}),
                            "data": {"type": "array", "items": _obj({
                                "object": STR, "index": INT,
                                "embedding": {"oneOf": [{"type": "array", "items": NUM}, STR]}},
                                ("object", "index", "embedding"))}},
                           ("object", "data", "model")),
        "ModelList": _obj({"object": STR, "data": {"type": "array", "items": _ref("Model")}}, ("object", "data")),
        "Model": _obj({"id": STR, "object": STR, "created": INT, "owned_by": STR, "root": STR},
                      ("id", "object", "created", "owned_by")),
        "TokenizeRequest": _obj({"model": _nullable(NONEMPTY), "prompt": STR,
                                 "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
                                 "add_special_tokens": _nullable(BOOL)},
                                description="prompt or messages; model defaults to the only ready one"),
        "Tokens": _obj({"tokens": TOKENS, "count": INT, "max_model_len": INT},
                       ("tokens", "count", "max_model_len")),
        "DetokenizeRequest": _obj({"model": _nullable(NONEMPTY), "tokens": TOKENS}, ("tokens",)),
        "Detokenized": _obj({"prompt": STR}, ("prompt",)),
        "TokenizerInfo": _obj({"tokenizer_class": STR, "vocab_size": INT, "model_max_length": INT,
                               "eos_token": _nullable(STR), "bos_token": _nullable(STR)},
                              ("vocab_size", "model_max_length")),
        "Health": _obj({"status": STR, "admin": STR}, ("status",)),
    }


def _json(schema: S) -> S:
    return {"application/json": {"schema": schema}}


def _errors(kind: str, codes: tuple[int, ...]) -> S:
    text = {400: "Invalid request", 401: "Missing or wrong API key", 403: "Key not allowed here",
            404: "Unknown model", 409: "Already published", 413: "Body too large",
            429: "Too many requests in flight for this model, or streams open for this key (see Retry-After)",
            503: "No ready replica, or the admin cannot be reached (see Retry-After)", 504: "Upstream timeout"}
    return {str(c): {"description": text[c], "content": _json(_ref(kind))} for c in codes}


DATA_ERRORS = (400, 401, 404, 413, 429, 503, 504)
SSE_EVENT = _obj({"event": STR, "data": {"type": "string", "description": (
    "a chunk as JSON (the non-streaming answer's shape, with `delta` for chat; the last may carry "
    "only `usage`), an error envelope if the replica broke off, then the literal [DONE]")}}, ("data",))
BEARER = [{"bearer": []}, {}]


def _op(summary: str, *, body: str | None = None, answer: S | None = None, errors: str = "OpenAIError",
        codes: tuple[int, ...] = DATA_ERRORS, stream: bool = False, security: Any = BEARER,
        params: list[S] | None = None, op_id: str = "") -> S:
    ok: S = {"description": "OK"}
    if answer is not None:
        ok["content"] = _json(answer)
        if stream:  # the schema of one event (OpenAPI 3.0: `schema` of an event stream is per event)
            ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
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


def document(server_url: str = "", max_n: int = 128) -> S:
    """The document; `max_n` is the frontend's --max-n (the bound on n and num_samples)."""
    sax_codes = (400, 401, 404, 413, 429, 503, 504)
    admin_codes = (400, 401, 403, 404, 409, 413, 503, 504)
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
                                codes=(400, 401, 503, 504), params=[_query("sax_cell", True)],
                                op_id="listall")},
        "/listcell": {"get": _op("One model's state (also as a JSON body {model})", answer=_ref("ListCell"),
                                 errors="SaxError", codes=(400, 401, 404, 503, 504),
                                 params=[_query("model", True)],
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
        **{path: {method: {"summary": summary, "operationId": f"{op}_{method}",
                            "responses": {"200": {"description": "OK (empty body)"}}} for method in methods}
           for path, methods, summary, op in (("/health", ("get",), "Liveness (vLLM's probe)", "health"),
                                              ("/ping", ("get", "post"), "Liveness (vLLM's probe)", "ping"))},
        "/version": {"get": {"summary": "Saxplane's version (vLLM's probe)", "operationId": "version",
                             "responses": {"200": {"description": "OK", "content": _json(
                                 {"type": "object", "properties": {"version": STR}})}}}},
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
        "components": {"schemas": _schemas(max_n),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
