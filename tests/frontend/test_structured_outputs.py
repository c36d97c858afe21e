"""Structured outputs and tool calling through a whole cell with the official openai SDK.

Its own small cell: admin, one model server, one frontend. `/sax/test/tools` is test.tiny's
random weights as a Hugging Face checkpoint whose chat template renders tools (Hermes /
Qwen style, tests/tool_models.py); `/sax/test/plain` is test.tiny, whose template ignores
tools. A model that knows nothing must still produce valid output: every answer is checked
against its schema.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jsonschema
import openai
import pytest
import requests

from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, publish_and_wait
from tests.tool_models import LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, save_tool_model

pytestmark = pytest.mark.slow

TOOLS_MODEL, PLAIN_MODEL = "/sax/test/tools", "/sax/test/plain"
#: the same weights with Mistral's and Llama 3.1's tool-call formats in their templates
FORMAT_MODELS = {"mistral": ("/sax/test/tools-mistral", MISTRAL_TEMPLATE),
                 "llama3": ("/sax/test/tools-llama3", LLAMA3_TEMPLATE)}
# Both models take these shapes: test.tiny's spec either way, so they share compiled programs.
OVERRIDES = {"num_slots": 4, "max_seq_len": 256, "prefill_buckets": [32, 256], "max_queue": 32}
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "inner": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "flag": {"type": "boolean"}},
                  "required": ["n", "flag"], "additionalProperties": False},
    },
    "required": ["ok", "kind", "tags", "inner"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "exact": {"type": "boolean"}},
        "required": ["zone", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME}}]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def cell(tmp_path_factory, tiny_compiled) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("structured")
    ckpt = save_tool_model(tmp / "tools-ckpt")
    procs = []
    try:
        admin = AdminProcess(tmp, root=str(tmp / "root")).start()
        procs.append(admin)
        procs.append(ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}").start())
        fe = FrontendProcess(tmp, admin.port).start()
        procs.append(fe)
        publish_and_wait(admin.url, PLAIN_MODEL, 1, overrides=OVERRIDES, timeout=400)
        publish_and_wait(admin.url, TOOLS_MODEL, 1, model_path="lm.hf", checkpoint=str(ckpt),
                         overrides=OVERRIDES, timeout=400)
        for name, (model_id, template) in FORMAT_MODELS.items():
            publish_and_wait(admin.url, model_id, 1, model_path="lm.hf", overrides=OVERRIDES, timeout=400,
                             checkpoint=str(save_tool_model(tmp / f"tools-{name}", template)))
        yield fe.url
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def client(cell) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cell}/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# --------------------------------------------------------------------------- response_format

def test_json_schema_answers_validate_at_temperature_one(client):
    for seed in range(4):
        r = client.chat.completions.create(model=PLAIN_MODEL, messages=USER, temperature=1.0, seed=seed,
                                           max_tokens=100, response_format=_schema_format(SCHEMA))
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=PLAIN_MODEL, prompt="Hello", temperature=1.0, seed=9, max_tokens=100, n=2,
                                  extra_body={"response_format": _schema_format(SCHEMA)})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_schema_streamed_with_logprobs(client):
    stream = client.chat.completions.create(model=PLAIN_MODEL, messages=USER, temperature=1.0, seed=11,
                                            max_tokens=100, logprobs=True, top_logprobs=2, stream=True,
                                            response_format=_schema_format(SCHEMA))
    text, lps = "", []
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            text += ch.choices[0].delta.content
        if ch.choices and ch.choices[0].logprobs:
            lps += ch.choices[0].logprobs.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert lps and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lps)


def test_json_object_answers_parse(client):
    for seed in range(3):
        r = client.chat.completions.create(model=PLAIN_MODEL, messages=USER, temperature=1.0, seed=seed,
                                           max_tokens=100, logit_bias={_token("}"): 6},
                                           response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_guided_choice_regex_and_structured_outputs(client):
    r = client.completions.create(model=PLAIN_MODEL, prompt="Hi", temperature=1.0, seed=1, max_tokens=20,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model=PLAIN_MODEL, prompt="Hi", temperature=1.0, seed=2, max_tokens=30,
                                  extra_body={"guided_regex": r"[A-Z][a-z]{2}-[0-9]{2}"})
    import re
    assert re.fullmatch(r"[A-Z][a-z]{2}-[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model=PLAIN_MODEL, messages=USER, temperature=1.0, seed=3, max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")


def test_bad_schemas_are_openai_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=PLAIN_MODEL, messages=USER, max_tokens=5, response_format=_schema_format(
            {"type": "object", "dependentRequired": {"a": ["b"]}}))
    assert "dependentRequired" in e.value.body["message"] and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=PLAIN_MODEL, messages=USER, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 3}})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=PLAIN_MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(a"})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=PLAIN_MODEL, prompt="x", max_tokens=5,
                                  extra_body={"guided_choice": ["a"], "guided_regex": "a"})


# --------------------------------------------------------------------------- tools

def _check_calls(calls, allowed=PARAMS):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), allowed[c.function.name])


def _stream_calls(client, model=TOOLS_MODEL, **kw):
    """The SDK's own reassembly of a streamed answer (chat.completions.stream)."""
    with client.chat.completions.stream(model=model, messages=USER, **kw) as s:
        final = s.get_final_completion()
    return final.choices[0]


def _token(text: str) -> str:
    from model_server.models import tiny

    return str(tiny.build_hf_tokenizer().convert_tokens_to_ids(text))


def test_tool_choice_required_plain_and_streaming(client):
    for seed in range(3):
        kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed,
                  max_tokens=100)
        r = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        assert len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls)
        st = _stream_calls(client, **kw)
        assert st.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in st.message.tool_calls] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls]


def test_tool_choice_required_parallel_calls_allowed(client):
    """parallel_tool_calls (default true) drops the one-call bound; every answer still validates
    and streams to the same calls. (This random model closes the array after one call, and with
    "," favoured runs past its small window; several calls in one stream:
    tests/model_server/test_tool_parsers.py.)"""
    ping = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}   # short calls: the window is small
    for seed in range(2):
        kw = dict(tools=[ping, TOOLS[1]], tool_choice="required", temperature=1.0, seed=seed, max_tokens=110)
        ch = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, **kw).choices[0]
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch.message.tool_calls, {"ping": ping["function"]["parameters"], "get_time": TIME})
        st = _stream_calls(client, **kw)
        assert [c.function.arguments for c in st.message.tool_calls] == \
            [c.function.arguments for c in ch.message.tool_calls]


def test_named_function_plain_and_streaming_with_logprobs(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                       temperature=1.0, seed=4, max_tokens=100, logprobs=True)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    _check_calls(ch.message.tool_calls, {"get_time": TIME})
    assert ch.logprobs.content and all(e.logprob <= 0 for e in ch.logprobs.content)
    st = _stream_calls(client, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=4, max_tokens=100)
    assert st.finish_reason == "tool_calls"
    assert st.message.tool_calls[0].function.arguments == ch.message.tool_calls[0].function.arguments


def test_auto_parses_hermes_calls_plain_and_streaming(client):
    # one call (the window is small; several calls in one reply: tests/model_server/test_tool_parsers.py)
    text = 'Hi <tool_call>{"name": "get_time", "arguments": {"zone": "UTC", "exact": true}}</tool_call>'
    force = {"structured_outputs": {"choice": [text]}}   # the tiny model writes exactly this
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=TOOLS, max_tokens=110,
                                       logprobs=True, extra_body=force)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Hi"
    assert [c.function.name for c in ch.message.tool_calls] == ["get_time"]
    _check_calls(ch.message.tool_calls)
    assert ch.logprobs.content
    st = _stream_calls(client, tools=TOOLS, max_tokens=110, extra_body=force)
    assert st.finish_reason == "tool_calls" and st.message.content.strip() == "Hi"
    assert [json.loads(c.function.arguments) for c in st.message.tool_calls] == \
        [json.loads(c.function.arguments) for c in ch.message.tool_calls]
    # text that is not a call stays content
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=TOOLS, max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["no call here"]}})
    assert r.choices[0].message.content == "no call here" and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


FORMAT_REPLIES = {  # two calls in one reply, in each family's own syntax
    "mistral": 'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET", "exact": false}}, '
               '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", "days": 2}}]',
    "llama3": '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET", "exact": false}}; '
              '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c", "days": 2}}',
}


@pytest.mark.parametrize("family", sorted(FORMAT_MODELS))
def test_auto_parses_mistral_and_llama3_parallel_calls(client, family):
    """`auto` on a model whose template speaks Mistral's or Llama 3.1's format: the reply the
    tiny model is forced to write is parsed into two tool calls, plain and streaming."""
    model = FORMAT_MODELS[family][0]
    force = {"structured_outputs": {"choice": [FORMAT_REPLIES[family]]}}
    want = [("get_time", {"zone": "CET", "exact": False}), ("get_weather", {"city": "Oslo", "unit": "c", "days": 2})]
    r = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, max_tokens=180, extra_body=force)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == want
    _check_calls(ch.message.tool_calls)
    assert len({c.id for c in ch.message.tool_calls}) == 2
    assert (ch.message.content or None) == ("Sure." if family == "mistral" else None)
    st = _stream_calls(client, model=model, tools=TOOLS, max_tokens=180, extra_body=force)
    assert st.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in st.message.tool_calls] == want
    # the history renders back through the family's template
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in ch.message.tool_calls]}, {"role": "tool", "tool_call_id": ch.message.tool_calls[0].id,
                                           "content": "12:00"}]
    again = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens


def test_history_with_tool_calls_and_tool_results(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_time", "arguments": json.dumps({"zone": "UTC", "exact": True})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    tools = TOOLS[1:]
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=history, tools=tools, tool_choice="none",
                                       max_tokens=3, temperature=0)
    short = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=tools, tool_choice="none",
                                           max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 20
    assert r.choices[0].message.tool_calls is None


def test_tool_errors_are_openai_400s(client):
    cases = [
        dict(model=TOOLS_MODEL, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(model=PLAIN_MODEL, tools=TOOLS),   # its template ignores tools
        dict(model=TOOLS_MODEL, tool_choice="required"),
        dict(model=TOOLS_MODEL, tools=[{"type": "function", "function": {"name": "bad name!"}}]),
        dict(model=TOOLS_MODEL, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "dependentRequired": {"a": ["b"]}}}}], tool_choice="required"),
    ]
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(messages=USER, max_tokens=5, **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
    r = requests.post(f"{client.base_url}chat/completions", timeout=30, json={
        "model": TOOLS_MODEL, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert r.status_code == 400 and "x" in r.json()["error"]["message"] and r.json()["error"]["param"] == "tool_choice"


# --------------------------------------------------------------------------- Sax API

def test_sax_generate_with_json_schema(cell):
    r = requests.post(f"{cell}/generate", timeout=60, json={
        "model": PLAIN_MODEL, "query": "Hello", "extra_inputs": {
            "temperature": 1.0, "num_samples": 2, "per_example_max_decode_steps": 100, "json_schema": SCHEMA}})
    assert r.status_code == 200, r.text
    for text, _score in r.json():
        jsonschema.validate(json.loads(text), SCHEMA)
    bad = requests.post(f"{cell}/generate", timeout=60, json={
        "model": PLAIN_MODEL, "query": "Hello", "extra_inputs": {"json_schema": {"dependentRequired": {}}}})
    assert bad.status_code == 400 and "dependentRequired" in bad.json()["error"]
