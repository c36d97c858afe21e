"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content."""
from __future__ import annotations

from typing import Optional

from model_server.api.toolcalls.base import ToolCall, ToolParser, call_from_object, json_values

MARK = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"
    start = MARK

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        i = text.find(MARK)
        if i < 0:
            return text, []
        values = json_values(text[i + len(MARK):])
        if not values:
            return text, []
        items = [x for v in values for x in (v if isinstance(v, list) else [v])]
        calls = [call_from_object(x) for x in items]
        if not calls or any(c is None for c in calls):
            return text, []
        content = text[:i].strip()
        return content or None, calls  # type: ignore[return-value]
