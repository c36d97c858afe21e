"""OpenAI `/v1/completions` and `/v1/chat/completions` over the engine.

Responses are byte-for-byte what the frontend serves (it forwards bodies and
streams without re-encoding), in the shapes of the official openai-python types.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from model_server.api import params as P
from model_server.api import structured, tools as T
from model_server.api.errors import ApiError, from_engine_error, invalid
from model_server.manager import ServedModel
from model_server.settings import RequestLimits

COMPLETION_KEYS = {"model", "prompt", "max_tokens", "logprobs", "echo", "stream", "stream_options",
                   "suffix", "best_of", "user"} | P.SAMPLING_KEYS | structured.KEYS
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
             "stream", "stream_options", "user", "response_format", "tools", "tool_choice",
             "parallel_tool_calls", "store", "metadata"} | P.SAMPLING_KEYS | structured.KEYS
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class Prepared:
    """A validated request: one or more prompts and what to do with them."""
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    sampling: Any                      # engine SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None
    handles: list[Any] = field(default_factory=list)
    tools: T.ToolPlan | None = None    # chat with tools: how replies become tool calls
    abandoned: Callable[[], bool] | None = None   # "the caller hung up": cancels a non-streaming wait


def _sampling_params(body: dict[str, Any], vocab_size: int, limits: RequestLimits, *, max_tokens: int,
                     logprobs: int | None, prompt_logprobs: bool, guided: Any = None) -> Any:
    from model_server.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          guided=guided, **P.sampling_fields(body, vocab_size, limits.max_n))


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = P.boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise invalid("'stream_options' supports include_usage only", "stream_options")
    if opts:
        P.boolean(opts, "continuous_usage_stats")
    return stream, bool(opts and P.boolean(opts, "include_usage"))


def prepare_completion(served: ServedModel, body: dict[str, Any],
                       limits: RequestLimits = RequestLimits()) -> Prepared:
    P.check_known(body, COMPLETION_KEYS)
    P.string(body, "user")
    engine = served.engine
    tok = engine.tokenizer
    vocab = served.loaded.spec.vocab_size
    if body.get("suffix") is not None:
        raise invalid("'suffix' is not supported", "suffix")
    prompt = body.get("prompt")
    prompts: list[list[int]]
    texts: list[str | None]
    if isinstance(prompt, str):
        prompts, texts = [tok.encode(prompt)], [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, texts = [tok.encode(p) for p in prompt], list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts, texts = [P.token_list(prompt, "prompt", vocab)], [None]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts, texts = [P.token_list(p, "prompt", vocab) for p in prompt], [None] * len(prompt)
    else:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                      "lists of token ids (non-empty)", "prompt")
    if any(not p for p in prompts):
        raise invalid("'prompt' must not be empty", "prompt")
    if len(prompts) > P.MAX_PROMPTS:
        raise invalid(f"at most {P.MAX_PROMPTS} prompts per request", "prompt")
    for ids in prompts:
        P.check_prompt_tokens(ids, limits)
    best_of = P.bounded(body, "best_of", None)
    if best_of is not None and best_of != (body.get("n") or 1):
        raise invalid("'best_of' other than n is not supported", "best_of")
    echo = P.boolean(body, "echo")
    logprobs = P.bounded(body, "logprobs", None)
    max_tokens = P.max_tokens(body, "max_tokens", 16, limits)
    if max_tokens == 0 and not echo:
        raise invalid("'max_tokens' may be 0 only with echo (scoring)", "max_tokens")
    stream, include_usage = _stream_flags(body)
    # max_tokens 0 runs the prompt through the scoring path (the engine generates nothing
    # otherwise), whether or not its logprobs are asked for.
    guided = structured.guided_spec(body)
    if guided is not None and max_tokens == 0:
        raise invalid("an output constraint needs max_tokens of at least 1", "max_tokens")
    sampling = _sampling_params(body, vocab, limits, max_tokens=max_tokens, logprobs=logprobs,
                                prompt_logprobs=echo and (logprobs is not None or max_tokens == 0),
                                guided=guided)
    return Prepared(prompts, texts, sampling, stream, include_usage, echo, logprobs)


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise invalid(f"messages[{index}].content must be a string or a list of text parts", "messages")


def prepare_chat(served: ServedModel, body: dict[str, Any],
                 limits: RequestLimits = RequestLimits()) -> Prepared:
    P.check_known(body, CHAT_KEYS)
    P.string(body, "user")
    engine = served.engine
    tok = engine.tokenizer
    vocab = served.loaded.spec.vocab_size
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if "name" in m and not isinstance(m["name"], str):
            raise invalid(f"messages[{i}].name must be a string", "messages")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}",
                          "messages")
        clean.append(T.history_message(m, i, _content_text(m.get("content"), i)))
    guided = structured.guided_spec(body)
    plan = T.plan(body, str(getattr(tok.hf, "chat_template", None) or ""))
    if plan is not None and plan.guided is not None:
        if guided is not None:
            raise invalid(f"tool_choice {plan.mode} constrains the reply itself; drop the output constraint",
                          guided.param)
        guided = plan.guided
    from model_server.tokenizer import TokenizerError
    try:
        ids = tok.encode_chat(clean, **({"tools": plan.tools} if plan is not None else {}))
        if plan is not None and ids == tok.encode_chat(clean):
            raise invalid("this model's chat template does not render tools", "tools")
    except TokenizerError as e:
        raise invalid(str(e), "tools" if plan is not None else "messages") from None
    P.check_prompt_tokens(ids, limits, "messages")
    want_logprobs = P.boolean(body, "logprobs")
    top = P.bounded(body, "top_logprobs", None)
    if top is not None and not want_logprobs:
        raise invalid("'top_logprobs' requires logprobs: true", "top_logprobs")
    default_max = max(engine.max_seq_len - len(ids), 1)
    max_tokens = P.max_tokens(body, "max_tokens", default_max, limits, lo=1)
    if body.get("max_completion_tokens") is not None:  # the newer name wins; both are checked
        max_tokens = P.max_tokens(body, "max_completion_tokens", default_max, limits, lo=1)
    stream, include_usage = _stream_flags(body)
    logprobs = (top or 0) if want_logprobs else None
    sampling = _sampling_params(body, vocab, limits, max_tokens=max_tokens, logprobs=logprobs,
                                prompt_logprobs=False, guided=guided)
    return Prepared([ids], [None], sampling, stream, include_usage, False, logprobs, tools=plan)


def submit(served: ServedModel, prep: Prepared) -> None:
    """Submits every prompt; on a refusal, cancels what was already submitted."""
    engine = served.engine
    sequences = len(prep.prompts) * (prep.sampling.n if prep.sampling.max_tokens > 0 else 1)
    if len(prep.prompts) > 1 and sequences > engine.num_slots + engine.max_queue:
        # More than the engine ever holds at once: "at capacity, retry later" would never pass.
        raise invalid(f"{len(prep.prompts)} prompts x n={prep.sampling.n} are {sequences} sequences, more than "
                      f"this server holds at once ({engine.num_slots + engine.max_queue}); send fewer per call",
                      "prompt")
    try:
        for ids in prep.prompts:
            prep.handles.append(served.engine.submit(ids, prep.sampling))
    except Exception as e:
        cancel(prep)
        raise from_engine_error(e) from e


def cancel(prep: Prepared) -> None:
    for h in prep.handles:
        h.cancel()


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


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


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


def handle(served: ServedModel, body: dict[str, Any], *, chat: bool, limits: RequestLimits = RequestLimits(),
           abandoned: Callable[[], bool] | None = None) -> tuple[dict[str, Any] | None, Iterator[bytes] | None]:
    """Runs a completion or chat request: (JSON body, None) or (None, SSE byte stream).
    `abandoned` tells a non-streaming wait that the caller has gone (its slots are freed)."""
    prep = (prepare_chat if chat else prepare_completion)(served, body, limits)
    prep.abandoned = abandoned
    submit(served, prep)
    name = body["model"]
    if prep.stream:
        return None, (chat_stream if chat else completion_stream)(served, prep, name)
    try:
        return (chat_response if chat else completion_response)(served, prep, name), None
    finally:
        cancel(prep)


__all__ = ["handle", "ApiError"]
