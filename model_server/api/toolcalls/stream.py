"""Streaming tool calls: text deltas of one choice -> chat `delta` objects.

* `NamedStream`: the output is the arguments of one named function (constrained): a first
  delta with the call's index, id and name, then the text as argument fragments.
* `RequiredStream`: the output is a JSON array `[{"name": ..., "parameters": {...}}, ...]`
  (constrained, compact, keys in that order): each call's name once it is written, then its
  arguments as they come.
* `AutoStream`: free text in the family's format: content streams (a possible start of the
  format's marker held back) until calls begin; the calls are parsed when the output ends.
"""
from __future__ import annotations

import abc
import json
import re
from typing import Any, Optional

from model_server.api.toolcalls.base import ToolCall, ToolParser

_HEAD = re.compile(r'"name":("(?:[^"\\]|\\.)*"),"parameters":')


def _start(index: int, call: ToolCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}


def _args(index: int, fragment: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


class CallStream(abc.ABC):
    """One choice's text deltas in, chat `delta` objects out."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    @abc.abstractmethod
    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that `text`, the output's next piece, completes."""

    def finish(self) -> list[dict[str, Any]]:
        return []


class NamedStream(CallStream):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[dict[str, Any]]:
        out = []
        if not self.calls:
            self.calls.append(ToolCall(self.name, ""))
            out.append(_start(0, self.calls[0]))
        if text:
            self.calls[0].arguments += text
            out.append(_args(0, text))
        return out


class RequiredStream(CallStream):
    def __init__(self) -> None:
        super().__init__()
        self.state = "open"       # open | item | head | args | close | sep | done
        self.head = ""
        self.depth = 0
        self.in_str = False
        self.esc = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        frag = []
        for c in text:
            st = self.state
            if st == "open":
                self.state = "item" if c == "[" else "done"
            elif st == "item":
                if c == "{":
                    self.state, self.head = "head", ""
            elif st == "head":
                self.head += c
                m = _HEAD.fullmatch(self.head)
                if m:
                    self.calls.append(ToolCall(json.loads(m.group(1)), ""))
                    out.append(_start(len(self.calls) - 1, self.calls[-1]))
                    self.state, self.depth, self.in_str, self.esc = "args", 0, False, False
            elif st == "args":
                frag.append(c)
                if self.in_str:
                    if self.esc:
                        self.esc = False
                    elif c == "\\":
                        self.esc = True
                    elif c == '"':
                        self.in_str = False
                elif c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                if self.depth == 0 and not self.in_str:
                    self._flush(out, frag)
                    self.state = "close"
            elif st == "close":
                self.state = "sep"
            elif st == "sep":
                self.state = "item" if c == "," else "done"
        self._flush(out, frag)
        return out

    def _flush(self, out: list, frag: list) -> None:
        if frag:
            s = "".join(frag)
            frag.clear()
            self.calls[-1].arguments += s
            out.append(_args(len(self.calls) - 1, s))


class AutoStream(CallStream):
    def __init__(self, parser: ToolParser) -> None:
        super().__init__()
        self.parser = parser
        self.pending = ""      # content not yet sent (may be the start of the marker)
        self.body: Optional[str] = None   # text from the marker on, once calls began
        self.sent_content = False

    def _hold(self, text: str) -> int:
        if self.parser.name == "llama3_json":   # calls only open the reply
            if self.sent_content:
                return 0
            s = text.lstrip()
            return len(text) if (not s or "<|python_tag|>".startswith(s)) else 0
        m = self.parser.start
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                return k
        return 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.body is not None:
            self.body += text
            return []
        self.pending += text
        i = -1 if (self.parser.name == "llama3_json" and self.sent_content) else self.parser.starts_calls(self.pending)
        if i >= 0:
            content, self.body, self.pending = self.pending[:i], self.pending[i:], ""
            return self._content(content)
        hold = self._hold(self.pending)
        content = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return self._content(content)

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.sent_content = True
        return [{"content": text}]

    def finish(self) -> list[dict[str, Any]]:
        if self.body is None:
            rest, self.pending = self.pending, ""
            return self._content(rest)
        content, calls = self.parser.parse(self.body)
        if not calls:
            return self._content(self.body)
        out = self._content(content or "")
        for i, c in enumerate(calls):
            self.calls.append(c)
            out += [_start(i, c), _args(i, c.arguments)]
        return out
