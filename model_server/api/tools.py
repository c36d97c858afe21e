"""Tool calling on chat: `tools`, `tool_choice`, `parallel_tool_calls` -> a `ToolPlan`.

* `none`: the tools are rendered, the reply is plain content.
* `auto`: the reply is free; calls written in the template's format are parsed
  (model_server/api/toolcalls/).
* `required`: the reply is constrained to a JSON array of calls of offered functions,
  `[{"name": ..., "parameters": {...}}]` (one item unless parallel_tool_calls), each
  `parameters` matching its function's JSON Schema.
* a named function: the reply is constrained to that function's arguments.
The tools reach the model through its chat template (`apply_chat_template(..., tools=...)`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from model_server.api.errors import invalid
from model_server.api.toolcalls import ToolCall, ToolParser, parser_for_template
from model_server.api.toolcalls.stream import AutoStream, CallStream, NamedStream, RequiredStream
from model_server.engine.guided import GuidedSpec

NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str                         # none | auto | required | named
    tools: list[dict[str, Any]]       # as the template takes them
    parser: ToolParser
    name: Optional[str] = None        # the named function
    guided: Optional[GuidedSpec] = None

    def stream(self) -> Optional[CallStream]:
        if self.mode == "named":
            return NamedStream(self.name or "")
        if self.mode == "required":
            return RequiredStream()
        if self.mode == "auto":
            return AutoStream(self.parser)
        return None

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content, calls) of a whole reply; an unparseable one stays content."""
        if self.mode == "none":
            return text, []
        if self.mode == "auto":
            return self.parser.parse(text)
        try:
            json.loads(text)
        except ValueError:
            return text, []
        # the arguments as generated (the same text a stream sends, and its logprobs' tokens)
        if self.mode == "named":
            return None, [ToolCall(self.name or "", text)]
        s = RequiredStream()
        s.feed(text)
        return None, s.calls


def _function(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise invalid(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"tools[{i}].function.name must match {NAME.pattern}", "tools")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise invalid(f"tools[{i}].function.description must be a string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise invalid(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    out = {"name": name, "parameters": params if params is not None else EMPTY_PARAMETERS}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    return out


def _required_schema(fns: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    items = [{"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": f["parameters"]},
              "required": ["name", "parameters"], "additionalProperties": False} for f in fns]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan(body: dict[str, Any], template: str) -> Optional[ToolPlan]:
    """The request's tool plan (None without tools); 400s for malformed tools or choices."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        if tools is not None and not isinstance(tools, list):
            raise invalid("'tools' must be a list", "tools")
        return None
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list", "tools")
    fns = [_function(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in fns]
    if len(set(names)) != len(names):
        raise invalid("tool function names must be unique", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    rendered = [{"type": "function", "function": {k: v for k, v in f.items()}} for f in fns]
    parser = parser_for_template(template)
    if choice is None or choice == "auto":
        return ToolPlan("auto", rendered, parser)
    if choice == "none":
        return ToolPlan("none", rendered, parser)
    if choice == "required":
        return ToolPlan("required", rendered, parser,
                        guided=GuidedSpec("json_schema", _required_schema(fns, parallel), "tools"))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        fn = next((f for f in fns if f["name"] == name), None)
        if fn is None:
            raise invalid(f"tool_choice names function {name!r}, which is not among the tools "
                          f"({', '.join(names)})", "tool_choice")
        return ToolPlan("named", rendered, parser, name=name,
                        guided=GuidedSpec("json_schema", fn["parameters"], "tools"))
    raise invalid("'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}", "tool_choice")


def _history_call(c: Any, i: int, j: int) -> dict[str, Any]:
    """One of an assistant message's `tool_calls`, arguments parsed to an object."""
    where = f"messages[{i}].tool_calls[{j}]"
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{where} must have a function with a name", "messages")
    if c.get("id") is not None and not isinstance(c["id"], str):
        raise invalid(f"{where}.id must be a string", "messages")
    if c.get("type", "function") != "function":
        raise invalid(f"{where}.type must be 'function'", "messages")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise invalid(f"{where}.function.arguments is not valid JSON", "messages") from None
    if not isinstance(args, dict):
        raise invalid(f"{where}.function.arguments must be a JSON object", "messages")
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def history_message(m: dict[str, Any], i: int, content: str) -> dict[str, Any]:
    """A chat message for the template, with an assistant's `tool_calls` (arguments as objects,
    as Hugging Face templates expect) and a tool result's `tool_call_id`."""
    role = m.get("role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    calls = m.get("tool_calls")
    if calls is not None:  # checked on any role (the request's shape), used on an assistant's
        if not isinstance(calls, list):
            raise invalid(f"messages[{i}].tool_calls must be a list", "messages")
        parsed = [_history_call(c, i, j) for j, c in enumerate(calls)]
        if role == "assistant" and parsed:
            out["tool_calls"] = parsed
    if role == "tool":
        if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise invalid(f"messages[{i}].tool_call_id must be a string", "messages")
        out["tool_call_id"] = m.get("tool_call_id")
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out
