"""OpenAI response bodies and SSE streams built from the engine's deltas of a `Prepared` request."""
from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any, Iterator

from model_server.api.openai_requests import Prepared, cancel
from model_server.api.sse import DONE, sse
from model_server.manager import ServedModel


def _merged(prep: Prepared) -> Iterator[tuple[int, Any]]:
    """(prompt index, Delta) from every handle as they come, whichever prompt they belong to."""
    if len(prep.handles) == 1:
        for d in prep.handles[0].deltas(prep.abandoned):
            yield 0, d
        return
    q: queue.Queue = queue.Queue()

    def pump(i: int, h: Any) -> None:
        try:
            for d in h.deltas(prep.abandoned):
                q.put((i, d))
        except Exception as e:  # surfaced to the consumer
            q.put((i, e))
        finally:
            q.put((i, None))

    for i, h in enumerate(prep.handles):
        threading.Thread(target=pump, args=(i, h), daemon=True).start()
    open_ = len(prep.handles)
    while open_:
        i, d = q.get()
        if d is None:
            open_ -= 1
        elif isinstance(d, Exception):
            raise d
        else:
            yield i, d


def _usage(prep: Prepared) -> dict[str, int]:
    prompt = sum(h.prompt_tokens for h in prep.handles)
    completion = sum(h.completion_tokens for h in prep.handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- completions -----------------------------------------------------------------------------

def _top_dict(entry: Any) -> dict[str, float] | None:
    """Legacy `top_logprobs` entry, best first. Distinct tokens can share a text piece
    (e.g. partial UTF-8 bytes); the best of them keeps the key, as is_greedy checks rely on."""
    if entry is None:
        return None
    out: dict[str, float] = {}
    for _, piece, lp in entry.top:
        out.setdefault(piece, lp)
    return out


class _CompletionLogprobs:
    """Accumulates the legacy completions logprobs object of one choice."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, entry: Any) -> None:
        self.tokens.append(entry.token if entry is not None else "")
        self.token_logprobs.append(entry.logprob if entry is not None else None)
        self.top_logprobs.append(_top_dict(entry))
        self.text_offset.append(self.offset)
        self.offset += len(entry.token) if entry is not None else 0

    def add_prompt(self, tok: Any, ids: list[int], entries: list[Any]) -> None:
        pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
        for piece, entry in zip(pieces, entries):
            self.tokens.append(piece)
            self.token_logprobs.append(entry.logprob if entry is not None else None)
            self.top_logprobs.append(_top_dict(entry))
            self.text_offset.append(self.offset)
            self.offset += len(piece)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}

    def delta(self, start: int) -> dict[str, Any]:
        return {k: v[start:] for k, v in self.to_dict().items()}


def _echo_text(served: ServedModel, prep: Prepared, i: int) -> str:
    text = prep.prompt_texts[i]
    return text if text is not None else served.engine.tokenizer.decode(prep.prompts[i], skip_special_tokens=False)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_response(served: ServedModel, prep: Prepared, model_name: str) -> dict[str, Any]:
    n = prep.sampling.n
    total = len(prep.prompts) * n
    texts = [""] * total
    finish: list[str | None] = [None] * total
    lps = [_CompletionLogprobs() for _ in range(total)] if prep.logprobs is not None else None
    if prep.echo:
        for i in range(len(prep.prompts)):
            for j in range(n):
                texts[i * n + j] = _echo_text(served, prep, i)
    for i, d in _merged(prep):
        idx = i * n + d.index
        if prep.echo and lps is not None and not lps[idx].tokens:
            lps[idx].add_prompt(served.engine.tokenizer, prep.prompts[i], prep.handles[i].prompt_logprobs or [])
        texts[idx] += d.text
        if lps is not None:
            for e in d.logprobs:
                lps[idx].add(e)
        if d.finish_reason:
            finish[idx] = d.finish_reason
    if prep.echo and lps is not None:  # max_tokens 0: no Delta carried the prompt logprobs
        for i in range(len(prep.prompts)):
            for j in range(n):
                if not lps[i * n + j].tokens:
                    lps[i * n + j].add_prompt(served.engine.tokenizer, prep.prompts[i],
                                              prep.handles[i].prompt_logprobs or [])
    choices = [{"index": k, "text": texts[k], "logprobs": lps[k].to_dict() if lps is not None else None,
                "finish_reason": finish[k] or "length"} for k in range(total)]
    return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(prep)}


def completion_stream(served: ServedModel, prep: Prepared, model_name: str) -> Iterator[bytes]:
    n = prep.sampling.n
    rid, created = _new_id("cmpl"), int(time.time())

    def chunk(index: int, text: str, logprobs: Any, finish: str | None) -> bytes:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish}]})

    try:
        lps: dict[int, _CompletionLogprobs] = {}
        echoed: set[int] = set()
        for i, d in _merged(prep):
            idx = i * n + d.index
            if prep.echo and idx not in echoed:
                echoed.add(idx)
                lp = None
                if prep.logprobs is not None:
                    lps[idx] = _CompletionLogprobs()
                    lps[idx].add_prompt(served.engine.tokenizer, prep.prompts[i], prep.handles[i].prompt_logprobs or [])
                    lp = lps[idx].to_dict()
                yield chunk(idx, _echo_text(served, prep, i), lp, None)
            lp = None
            if prep.logprobs is not None:
                acc = lps.setdefault(idx, _CompletionLogprobs())
                start = len(acc.tokens)
                for e in d.logprobs:
                    acc.add(e)
                lp = acc.delta(start)
            if d.text or d.finish_reason or (lp and lp["tokens"]):
                yield chunk(idx, d.text, lp, d.finish_reason)
        if prep.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                       "choices": [], "usage": _usage(prep)})
        yield DONE
    finally:
        cancel(prep)  # no-op when finished; frees the slots when the client went away


# -- chat ------------------------------------------------------------------------------------

def _chat_logprob(tok: Any, entry: Any) -> dict[str, Any]:
    def one(token_id: int, piece: str, lp: float) -> dict[str, Any]:
        return {"token": piece, "logprob": lp, "bytes": list(tok.token_bytes(token_id))}

    return {**one(entry.token_id, entry.token, entry.logprob),
            "top_logprobs": [one(t, s, lp) for t, s, lp in entry.top]}


def chat_response(served: ServedModel, prep: Prepared, model_name: str) -> dict[str, Any]:
    n = prep.sampling.n
    tok = served.engine.tokenizer
    texts = [""] * n
    finish: list[str | None] = [None] * n
    lps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for _, d in _merged(prep):
        texts[d.index] += d.text
        if prep.logprobs is not None:
            lps[d.index].extend(_chat_logprob(tok, e) for e in d.logprobs)
        if d.finish_reason:
            finish[d.index] = d.finish_reason
    choices = []
    for k in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": texts[k]}
        reason = finish[k] or "length"
        if prep.tools is not None and reason == "stop":
            content, calls = prep.tools.parse(texts[k])
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.to_dict() for c in calls]}
                reason = "tool_calls"
        choices.append({"index": k, "message": message,
                        "logprobs": {"content": lps[k]} if prep.logprobs is not None else None,
                        "finish_reason": reason})
    return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(prep)}


def chat_stream(served: ServedModel, prep: Prepared, model_name: str) -> Iterator[bytes]:
    n = prep.sampling.n
    tok = served.engine.tokenizer
    rid, created = _new_id("chatcmpl"), int(time.time())

    def chunk(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish}]})

    calls = [prep.tools.stream() if prep.tools is not None else None for _ in range(n)]
    try:
        for k in range(n):
            yield chunk(k, {"role": "assistant", "content": ""}, None, None)
        for _, d in _merged(prep):
            lp = ({"content": [_chat_logprob(tok, e) for e in d.logprobs]}
                  if prep.logprobs is not None and d.logprobs else None)
            cs = calls[d.index]
            if cs is None:
                if d.text or lp:
                    yield chunk(d.index, {"content": d.text}, lp, None)
            else:  # tool calls: the text becomes content and/or tool_calls deltas
                deltas = cs.feed(d.text) + (cs.finish() if d.finish_reason else [])
                if lp and not deltas:
                    deltas = [{}]
                for j, delta in enumerate(deltas):
                    yield chunk(d.index, delta, lp if j == 0 else None, None)
            if d.finish_reason:
                reason = "tool_calls" if cs is not None and cs.calls and d.finish_reason == "stop" \
                    else d.finish_reason
                yield chunk(d.index, {}, None, reason)
        if prep.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "choices": [], "usage": _usage(prep)})
        yield DONE
    finally:
        cancel(prep)
