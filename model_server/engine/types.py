"""Public request/response types of the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from model_server.engine.guided import GuidedSpec

#: Most top alternatives a request may ask for (`logprobs`), as OpenAI and vLLM.
MAX_LOGPROBS = 20
#: Most `logit_bias` entries per request.
MAX_LOGIT_BIAS = 1024


@dataclass
class SamplingParams:
    max_tokens: int = 16            # 0 allowed only with prompt_logprobs (scoring)
    temperature: float = 1.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0
    seed: Optional[int] = None      # same seed -> same output, whatever else is in the batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)         # on text, across token boundaries, never emitted
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; k>=0: chosen token's logprob + top-k alternatives
    prompt_logprobs: bool = False   # logprob of every prompt token given its prefix (first is None)
    n: int = 1                      # independent samples (indexes 0..n-1; seeds derived from seed)
    guided: Optional["GuidedSpec"] = None  # output constrained to a grammar (JSON schema, regex, ...)
    prefix_caching: bool = True     # reuse (and offer) cached KV blocks of the prompt's prefix


@dataclass
class TokenLogprob:
    token_id: int
    token: str                      # the token's text piece, decoded alone
    logprob: float
    top: list[tuple[int, str, float]]   # (token_id, piece, logprob), best first, len == requested k


@dataclass
class Delta:
    """One event of one sample."""

    index: int                      # which of the n samples
    text: str                       # new text (never splits UTF-8; stop strings held back then cut)
    token_ids: list[int]
    logprobs: list[TokenLogprob]    # one per token of this delta when logprobs requested, else []
    finish_reason: Optional[str]    # None while running; "stop" or "length" at the end


@dataclass
class Completion:
    """Everything one sample produced (`RequestHandle.result()`)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: Optional[str]


class EngineError(Exception):
    """The engine cannot serve the request (stopped, failed)."""


class InvalidRequest(EngineError):
    """A request the model cannot serve as asked; the message is user-facing."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class QueueFull(EngineError):
    """More waiting requests than the queue bound; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
