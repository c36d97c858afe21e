"""Hermes / Qwen 2.5+: each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`."""
from __future__ import annotations

import json
import re
from typing import Optional

from model_server.api.toolcalls.base import ToolCall, ToolParser, call_from_object

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        calls = []
        for m in _CALL.finditer(text):
            try:
                call = call_from_object(json.loads(m.group(1).strip()))
            except ValueError:
                call = None
            if call is None:
                return text, []   # not a well-formed call: all of it stays content
            calls.append(call)
        if not calls:
            return text, []
        content = _CALL.sub("", text).strip()
        return content or None, calls
