"""What every tool-call format shares: a parsed call, the parser interface, JSON helpers."""
from __future__ import annotations

import abc
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ToolCall:
    name: str
    arguments: str          # a JSON text, as OpenAI's `function.arguments`
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_from_object(obj: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> Optional[ToolCall]:
    """{"name": ..., "arguments" | "parameters": {...}} -> ToolCall, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def json_values(text: str) -> Optional[list[Any]]:
    """Every JSON value of `text`, one after another (separated by whitespace, ';' or ','), or
    None if anything else is there."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


class ToolParser(abc.ABC):
    """A model family's tool-call format. `start` marks where calls begin in the output (text
    before it is content); `parse` splits a whole output into content and calls."""

    name = ""
    start = ""

    @abc.abstractmethod
    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content or None, calls) of a whole output."""

    def starts_calls(self, text: str) -> int:
        """Index in `text` where the calls begin, or -1."""
        return text.find(self.start)
