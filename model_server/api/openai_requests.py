"""OpenAI request bodies validated into `Prepared` (prompts, sampling, stream flags) and submitted."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from model_server.api import params as P
from model_server.api import structured, tools as T
from model_server.api.errors import from_engine_error, invalid
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


def _checked(served: ServedModel, body: dict[str, Any], keys: set[str]) -> tuple[Any, Any, int]:
    """Refuses unknown keys and a non-string `user`; the engine, its tokenizer and the vocabulary size."""
    P.check_known(body, keys)
    P.string(body, "user")
    return served.engine, served.engine.tokenizer, served.loaded.spec.vocab_size


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
    _, tok, vocab = _checked(served, body, COMPLETION_KEYS)
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
    engine, tok, vocab = _checked(served, body, CHAT_KEYS)
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
    """Cancels every submitted prompt (a no-op for those already finished)."""
    for h in prep.handles:
        h.cancel()
