"""Llama 3.1+ JSON tool calls: the reply is `{"name": ..., "parameters": {...}}` (several
separated by `;`), optionally after `<|python_tag|>`."""
from __future__ import annotations

from typing import Optional

from model_server.api.toolcalls.base import ToolCall, ToolParser, call_from_object, json_values

TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "{"

    def starts_calls(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return -1

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        i = self.starts_calls(text)
        if i < 0:
            return text, []
        body = text[i:]
        if body.startswith(TAG):
            body = body[len(TAG):]
        values = json_values(body)
        calls = [call_from_object(v) for v in values or []]
        if not calls or any(c is None for c in calls):
            return text, []
        return None, calls  # type: ignore[return-value]
