"""Tool-call formats, one module each, and which one a chat template speaks."""
from __future__ import annotations

from model_server.api.toolcalls.base import ToolCall, ToolParser
from model_server.api.toolcalls.hermes import HermesParser
from model_server.api.toolcalls.llama3 import Llama3JsonParser
from model_server.api.toolcalls.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for_template(template: str) -> ToolParser:
    """The format a chat template asks the model to write calls in (Hermes when it says nothing
    recognisable: Qwen, Hermes and most fine-tunes use it)."""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<tool_call>" in template:
        return HermesParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonParser()
    return HermesParser()


__all__ = ["ToolCall", "ToolParser", "PARSERS", "parser_for_template"]
