"""The OpenAI API through the frontend, with the official `openai` package as the client."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.frontend.conftest import ALIAS, FLAG_ALIAS, MODEL, Cell


@pytest.fixture(scope="module")
def client(cell: Cell) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cell.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("id", "created")}


def test_models_lists_ready_models_and_aliases(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {MODEL, ALIAS, FLAG_ALIAS, "/sax/test/fake", "/sax/test/flaky"} <= set(models)
    assert "/sax/test/empty" not in models  # no ready replica
    assert all(m.object == "model" and m.owned_by == "saxplane" for m in models.values())
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_completion_equals_model_server_answer(cell: Cell, client: openai.OpenAI) -> None:
    kw = dict(prompt="The rain in Spain", max_tokens=6, temperature=0, logprobs=3)
    c = client.completions.create(model=MODEL, **kw)
    direct = cell.direct("/v1/completions", {"model": MODEL, **kw}).json()
    mine = c.model_dump(exclude_unset=True)
    assert mine["choices"][0]["text"] == direct["choices"][0]["text"] and mine["usage"] == direct["usage"]
    assert mine["choices"][0]["logprobs"]["tokens"] == direct["choices"][0]["logprobs"]["tokens"]
    assert mine["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        direct["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    assert _strip(mine).keys() == _strip(direct).keys()
    choice = c.choices[0]
    assert c.object == "text_completion" and choice.index == 0 and choice.finish_reason in ("length", "stop")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    # Greedy: the chosen token is the best one (pieces that decode alike keep their best logprob).
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(t) for top, t in zip(lp.top_logprobs,
                                                                                         lp.token_logprobs))
    assert c.usage.completion_tokens == 6 and c.usage.total_tokens == c.usage.prompt_tokens + 6


def test_echo_scoring_with_token_ids(cell: Cell, client: openai.OpenAI) -> None:
    kw = dict(prompt=[[261, 355, 275, 281, 280]], max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = client.completions.create(model=MODEL, **kw)
    direct = cell.direct("/v1/completions", {"model": MODEL, **kw}).json()
    mine, theirs = c.choices[0].logprobs.token_logprobs, direct["choices"][0]["logprobs"]["token_logprobs"]
    assert mine[0] is None and theirs[0] is None and len(c.choices[0].logprobs.tokens) == 5
    assert mine[1:] == pytest.approx(theirs[1:], abs=1e-4)


def test_echo_with_max_tokens_0_and_no_logprobs(cell: Cell, client: openai.OpenAI) -> None:
    """As OpenAI answers it: the prompt echoed, finish_reason "length", no completion tokens."""
    c = client.completions.create(model=MODEL, prompt="The rain in Spain", max_tokens=0, echo=True)
    direct = cell.direct("/v1/completions", {"model": MODEL, "prompt": "The rain in Spain", "max_tokens": 0,
                                             "echo": True}).json()
    choice = c.choices[0]
    assert (choice.text, choice.finish_reason, choice.logprobs) == ("The rain in Spain", "length", None)
    assert c.usage.completion_tokens == 0 and c.usage.model_dump(exclude_unset=True) == direct["usage"]
    assert c.usage.prompt_tokens == c.usage.total_tokens > 0


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    kw = dict(prompt="Once upon a time", max_tokens=8, temperature=0)
    whole = client.completions.create(model=MODEL, **kw)
    chunks = list(client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                            **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert {ch.id for ch in chunks} == {chunks[0].id}
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_and_chat_stream(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert chat.object == "chat.completion" and chat.model == ALIAS
    msg = chat.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 and isinstance(c.bytes, list) for c in content)
    stream = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens


@pytest.mark.parametrize("name", [ALIAS, FLAG_ALIAS])
def test_aliases_answer_under_the_name_used(client: openai.OpenAI, name: str) -> None:
    c = client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
    assert c.model == name
    chunks = list(client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0, stream=True))
    assert {ch.model for ch in chunks} == {name}
    by_id = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert by_id.choices[0].text == c.choices[0].text


def test_embeddings_single_and_list(cell: Cell, client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    many = client.embeddings.create(model=FLAG_ALIAS, input=["hello", "world", "again"], encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2] and many.model == FLAG_ALIAS
    assert many.data[0].embedding == pytest.approx(one.data[0].embedding)
    direct = cell.direct("/v1/embeddings", {"model": MODEL, "input": ["world"]}).json()
    assert many.data[1].embedding == pytest.approx(direct["data"][0]["embedding"])
    assert many.usage.prompt_tokens == sum(
        cell.direct("/v1/embeddings", {"model": MODEL, "input": t}).json()["usage"]["prompt_tokens"]
        for t in ("hello", "world", "again"))


def test_async_client_16_concurrent(cell: Cell) -> None:
    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=f"{cell.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            calls = []
            for i in range(16):
                if i % 2:
                    calls.append(aclient.completions.create(model=MODEL, prompt="Hello world", max_tokens=4,
                                                            temperature=0))
                else:
                    calls.append(aclient.chat.completions.create(
                        model=ALIAS, messages=[{"role": "user", "content": "Hello world"}], max_tokens=4,
                        temperature=0))
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    completions = {r.choices[0].text for r in results if r.object == "text_completion"}
    chats = {r.choices[0].message.content for r in results if r.object == "chat.completion"}
    assert len(results) == 16 and len(completions) == 1 and len(chats) == 1  # greedy: all the same


def test_sdk_errors(cell: Cell, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="/sax/test/nope", prompt="x", max_tokens=1)
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logprobs=99)
    assert bad.value.param == "logprobs"
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.completions.create(model="/sax/test/empty", prompt="x", max_tokens=1)
    assert unavailable.value.status_code == 503 and unavailable.value.response.headers["Retry-After"] == "1"
