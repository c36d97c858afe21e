"""Tool-call formats (Hermes/Qwen, Llama 3 JSON, Mistral) and the streamed tool-call deltas,
reassembled the way the openai SDK does (by index: id and name once, arguments appended)."""
from __future__ import annotations

import json

import pytest

from model_server.api.toolcalls import parser_for_template
from model_server.api.toolcalls.hermes import HermesParser
from model_server.api.toolcalls.llama3 import Llama3JsonParser
from model_server.api.toolcalls.mistral import MistralParser
from model_server.api.toolcalls.stream import AutoStream, NamedStream, RequiredStream

W = {"city": "Oslo", "days": 2}
T = {"zone": "UTC"}
CASES = [
    (HermesParser(), 'Sure. <tool_call>\n{"name": "w", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
                     '<tool_call>{"name": "t", "arguments": {"zone": "UTC"}}</tool_call>', "Sure."),
    (Llama3JsonParser(), '{"name": "w", "parameters": {"city": "Oslo", "days": 2}}; '
                         '{"name": "t", "parameters": {"zone": "UTC"}}', None),
    (Llama3JsonParser(), '<|python_tag|>{"name": "w", "parameters": {"city": "Oslo", "days": 2}}'
                         '{"name": "t", "parameters": {"zone": "UTC"}}', None),
    (MistralParser(), 'Let me look.[TOOL_CALLS][{"name": "w", "arguments": {"city": "Oslo", "days": 2}}, '
                      '{"name": "t", "arguments": {"zone": "UTC"}}]', "Let me look."),
]


def reassemble(deltas):
    """What openai's ChatCompletionStreamState does with delta.tool_calls and delta.content."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            c = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if tc.get("id"):
                assert c["id"] is None, "id sent twice"
                c["id"] = tc["id"]
            fn = tc.get("function") or {}
            if fn.get("name"):
                assert c["name"] is None, "name sent twice"
                c["name"] = fn["name"]
            c["arguments"] += fn.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("parser,text,content", CASES, ids=lambda x: getattr(x, "name", None))
def test_parse_whole_and_streamed(parser, text, content):
    got_content, calls = parser.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("w", W), ("t", T)]
    for step in (1, 3, 7):
        s = AutoStream(parser)
        deltas = [d for i in range(0, len(text), step) for d in s.feed(text[i:i + step])] + s.finish()
        streamed_content, streamed = reassemble(deltas)
        assert streamed_content.strip() == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [("w", W), ("t", T)]
        assert all(c["id"] for c in streamed)


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()], ids=lambda p: p.name)
def test_text_without_calls_stays_content(parser):
    for text in ["Just words, no call.", "<tool_call>{not json}</tool_call>", "[TOOL_CALLS] nope", "{\"a\": 1}"]:
        content, calls = parser.parse(text)
        assert calls == [] and content == text
        s = AutoStream(parser)
        deltas = [d for ch in text for d in s.feed(ch)] + s.finish()
        assert reassemble(deltas) == (text, [])


def test_required_and_named_streams():
    text = '[{"name":"w","parameters":{"city":"O\\"slo}","days":2}},{"name":"t","parameters":{"zone":"UTC"}}]'
    for step in (1, 5, len(text)):
        s = RequiredStream()
        deltas = [d for i in range(0, len(text), step) for d in s.feed(text[i:i + step])]
        _, calls = reassemble(deltas)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [("w", {"city": 'O"slo}', "days": 2}), ("t", T)]
    s = NamedStream("t")
    _, calls = reassemble(s.feed('{"zone"') + s.feed(':"UTC"}'))
    assert calls[0]["name"] == "t" and json.loads(calls[0]["arguments"]) == T


def test_format_from_template():
    assert parser_for_template("...{{ '[TOOL_CALLS]' }}...").name == "mistral"
    assert parser_for_template("<tool_call>\n{{ tool_call | tojson }}").name == "hermes"
    assert parser_for_template("{%- if tools %}<|python_tag|>{% endif %}ipython").name == "llama3_json"
