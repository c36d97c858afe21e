"""Structured-output request fields -> the engine's `GuidedSpec`.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}) and vLLM's
extras: the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and the
newer `structured_outputs` object ({"json" | "regex" | "choice" | "grammar" | "json_object"}).
At most one constraint per request. Whether the grammar compiles is the engine's check.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from model_server.api.errors import invalid
from model_server.engine.guided import GuidedSpec

GUIDED_KEYS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                           "json_object": "json_object"}
KEYS = {"response_format", "structured_outputs"} | set(GUIDED_KEYS)


def _schema(value: Any, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise invalid(f"'{param}' is not valid JSON", param) from None
    if not isinstance(value, dict):
        raise invalid(f"'{param}' must be a JSON schema object", param)
    return value


def _response_format(fmt: Any) -> Optional[GuidedSpec]:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_object", None, "response_format")
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise invalid("response_format json_schema needs a 'json_schema' object", "response_format")
        if "name" in js and not isinstance(js["name"], str):
            raise invalid("response_format.json_schema.name must be a string", "response_format")
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise invalid("response_format.json_schema.strict must be a boolean", "response_format")
        schema = js.get("schema", {"type": "object"})
        return GuidedSpec("json_schema", _schema(schema, "response_format"), "response_format")
    raise invalid(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                  "response_format")


def _value(kind: str, value: Any, param: str) -> GuidedSpec:
    if kind == "json_schema":
        return GuidedSpec(kind, _schema(value, param), param)
    if kind == "json_object":
        if value is not True:
            raise invalid(f"'{param}' json_object must be true", param)
        return GuidedSpec(kind, None, param)
    return GuidedSpec(kind, value, param)   # regex / choice / grammar: shapes checked by the engine


def guided_spec(body: dict[str, Any]) -> Optional[GuidedSpec]:
    """The one output constraint the body asks for, or None."""
    found: list[GuidedSpec] = []
    fmt = body.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(spec)
    for key, kind in GUIDED_KEYS.items():
        if body.get(key) is not None:
            found.append(_value(kind, body[key], key))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("'structured_outputs' must be an object", "structured_outputs")
        unknown = sorted(set(so) - set(STRUCTURED_OUTPUTS_KEYS))
        if unknown:
            raise invalid(f"'structured_outputs' does not take {', '.join(unknown)}", "structured_outputs")
        for key, kind in STRUCTURED_OUTPUTS_KEYS.items():
            if so.get(key) is not None and so.get(key) is not False:
                found.append(_value(kind, so[key], "structured_outputs"))
    if len(found) > 1:
        raise invalid("give one output constraint (response_format, structured_outputs or one guided_* "
                      f"field), got {len(found)}", found[1].param)
    return found[0] if found else None
