"""The bounds of a data request's fields: one table for the model server's APIs
(model_server/api/params.py, sax.py) and its engine's validation (model_server/engine/validation.py),
so a value is refused, or taken, the same way on every path.

The sampling bounds are OpenAI's (temperature 0-2, top_p 0-1, penalties -2..2, logit_bias
-100..100, at most 4 stop sequences, top_logprobs up to 20); the fields OpenAI lacks take vLLM's
meaning (top_k -1 or 0: off; repetition_penalty 1: off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """A closed range [lo, hi]; `integer` fields take whole numbers only (no bool, no float)."""

    lo: float
    hi: float
    integer: bool = False

    def holds(self, value: Any, hi: float | None = None) -> bool:
        """Whether `value` is of the field's kind and within [lo, hi] (`hi` narrows the table's)."""
        if isinstance(value, bool):
            return False
        if self.integer:
            if not isinstance(value, int) and not (hasattr(value, "dtype") and value.dtype.kind in "iu"):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return self.lo <= value <= (self.hi if hi is None else hi)

    def describe(self, hi: float | None = None) -> str:
        return f"between {_num(self.lo)} and {_num(self.hi if hi is None else hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1 << 70 else str(x)


#: Field name -> its bounds. `n` and `max_tokens` may be narrowed further by a server's limits
#: (--max-n, --max-tokens) and the engine's slots and context window.
REQUEST_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0),
    "top_k": Bound(-1, 1 << 20, integer=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.01, 10.0),
    "logit_bias": Bound(-100.0, 100.0),            # each bias value
    "max_tokens": Bound(0, 1 << 24, integer=True),  # 0 only when scoring the prompt (echo)
    "n": Bound(1, 1 << 16, integer=True),         # a server takes at most its --max-n (128)
    "best_of": Bound(1, 1 << 20, integer=True),
    "logprobs": Bound(0, 20, integer=True),
    "top_logprobs": Bound(0, 20, integer=True),
    "seed": Bound(-(1 << 63), (1 << 64) - 1, integer=True),
}

MAX_STOP = 4            # stop sequences per request
MAX_LOGIT_BIAS = 1024   # logit_bias entries per request
MAX_PROMPTS = 128       # prompts per completions call, suffixes per score call
