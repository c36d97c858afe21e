"""Guided decoding: a per-request grammar turned into a packed token bitmask per step.

Grammars (JSON Schema, any JSON object, a regex, a choice of strings, a Lark grammar) are
compiled by llguidance against the model's Hugging Face tokenizer; llguidance was picked over
xgrammar because it refuses a schema keyword it does not implement (the request gets a 400
naming it) instead of silently dropping the constraint, at a mask cost that fits the step
(bench/RESULTS.md, "Guided decoding").

The engine's side is small: each guided sample holds a `Matcher` (fill its row's bits; accept a
token; terminated), and `Guide` the host bitmask `mask` [num_slots, words] int32 (bit t of row
r: token t allowed; rows without a grammar stay all ones), one row per decode slot. The device
programs take that mask as one more input (`sampling.apply_token_mask`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from model_server.engine.types import InvalidRequest

log = logging.getLogger(__name__)

#: Distinct compiled grammars kept per engine (validation result + grammar text).
CACHE_SIZE = 256
#: llguidance's per-step work bounds, 10x/4x its defaults: a random-weight model wandering
#: through a long bounded string of a 32k vocabulary ran past the default lexer fuel once.
LIMITS = {"step_lexer_fuel": 2_000_000, "step_max_items": 200_000}
#: llguidance stop reasons that mean "the output is complete" (others are failures)
COMPLETE = frozenset({"NoExtension", "NoExtensionBias", "EndOfSentence"})
JSON_OPTIONS = {"whitespace_flexible": False}   # compact JSON: a model cannot pad forever


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must match. kind: json_schema | json_object | regex | choice | grammar."""

    kind: str
    value: Any = None
    param: str = "response_format"   # the request field it came from, for error messages

    def key(self) -> str:
        return self.kind + "\0" + json.dumps(self.value, sort_keys=True)


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _lark_literal(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


def grammar_text(spec: GuidedSpec) -> str:
    """llguidance grammar for `spec` (not yet validated)."""
    import llguidance

    M = llguidance.LLMatcher
    if spec.kind == "json_schema":
        if not isinstance(spec.value, dict):
            raise InvalidRequest("the JSON schema must be an object", spec.param)
        return M.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        if not isinstance(spec.value, str) or not spec.value:
            raise InvalidRequest("the regex must be a non-empty string", spec.param)
        return M.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        if not (isinstance(spec.value, list) and spec.value and all(isinstance(c, str) and c for c in spec.value)):
            raise InvalidRequest("the choice must be a non-empty list of non-empty strings", spec.param)
        return M.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in spec.value))
    if spec.kind == "grammar":
        if not isinstance(spec.value, str) or not spec.value.strip():
            raise InvalidRequest("the grammar must be a non-empty Lark grammar", spec.param)
        return M.grammar_from_lark(spec.value)
    raise InvalidRequest(f"unknown guided decoding kind {spec.kind!r}", spec.param)


class Matcher:
    """One sample's grammar state."""

    def __init__(self, matcher: Any):
        self.m = matcher

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar refuses it."""
        return bool(self.m.consume_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return bool(self.m.is_stopped()) and not self.failed

    @property
    def failed(self) -> bool:
        """The matcher gave up (an error, or a resource bound while computing a mask)."""
        return bool(self.m.is_error()) or (bool(self.m.is_stopped()) and self.m.stop_reason() not in COMPLETE)

    @property
    def error(self) -> str:
        return self.m.get_error()


class Guide:
    """Grammar compilation (cached) and the per-slot matchers and bitmask of one engine."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, num_slots: int,
                 eos_token_ids: Sequence[int], threads: Optional[int] = None):
        self.vocab_size = int(vocab_size)
        self.words = words_for(vocab_size)
        self.num_slots = int(num_slots)
        self._hf = hf_tokenizer
        self._eos = [int(e) for e in eos_token_ids]
        self._threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._tok: Any = None
        self._executor: Any = None
        self._pool: Optional[ThreadPoolExecutor] = None  # the mask thread (fill_async)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        #: host bitmask, one row per slot; all ones (-1) where a slot has no grammar
        self.mask = np.full((self.num_slots, self.words), -1, np.int32)
        bits = np.zeros((self.words * 32,), np.uint8)
        bits[[e for e in self._eos if 0 <= e < self.vocab_size]] = 1
        self._eos_row = np.packbits(bits, bitorder="little").view(np.int32)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance
                import llguidance.hf

                eos = self._eos[0] if len(self._eos) == 1 else (self._eos or None)
                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
                self._executor = llguidance.LLExecutor(self._threads)
            return self._tok

    # ------------------------------------------------------------------ compile

    def compile(self, spec: GuidedSpec) -> str:
        """The validated grammar for `spec`; InvalidRequest naming what is unsupported."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        import llguidance

        try:
            text = grammar_text(spec)
        except InvalidRequest:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the library says is about this input
            raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {e}", spec.param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self._tokenizer())
        if is_error:
            what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(spec.kind, spec.kind)
            raise InvalidRequest(f"unsupported {what}: {'; '.join(messages)}", spec.param)
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = text
        return text

    # ------------------------------------------------------------------ sequences

    def matcher(self, grammar: str) -> Matcher:
        """A fresh matcher for one sample (it lives on the sample, so a preempted sample
        resumes with its grammar state)."""
        import llguidance

        m = Matcher(llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0,
                                         limits=llguidance.LLParserLimits(**LIMITS)))
        if m.m.is_error():
            raise InvalidRequest(f"the grammar failed: {m.error}")
        return m

    def clear(self, slot: int) -> None:
        """A slot's row back to all ones (no grammar)."""
        self.mask[slot] = -1

    def fill(self, rows: Sequence[tuple[Matcher, int]]) -> np.ndarray:
        """Fill the bitmask rows of (matcher, slot) pairs, in parallel; a terminated matcher's
        row allows everything (its sample is finishing: the token is dropped); a matcher that
        fails while computing its mask (a resource bound) allows only end-of-sequence, so its
        sample ends instead of leaving the grammar. Returns a copy of the whole mask (on CPU
        `device_put` may alias the host buffer, which the next fill rewrites)."""
        import llguidance.numpy as lln

        todo = []
        for m, s in rows:
            if m.failed:
                self.mask[s] = self._eos_row
            elif m.terminated:
                self.mask[s] = -1
            else:
                todo.append((m, s))
        if todo:
            self._tokenizer()
            lln.fill_next_token_bitmask_par(self._executor, [(m.m, s) for m, s in todo], self.mask)
            for m, s in todo:
                if m.failed:
                    log.warning("guided decoding gave up on slot %d (%s): %s", s, m.m.stop_reason(),
                                m.error[:300])
                    self.mask[s] = self._eos_row
        return self.mask.copy()

    def fill_async(self, rows: Sequence[tuple[Matcher, int]]) -> "Future[np.ndarray]":
        """`fill` on the guide's mask thread, so the caller's own host work (the previous
        step's outputs) runs meanwhile: llguidance computes masks without the GIL. Until the
        future is done nothing may advance these matchers or touch the mask."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-mask")
        return self._pool.submit(self.fill, rows)

    def close(self) -> None:
        """Stop the mask thread (a later `fill_async` starts another)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    @staticmethod
    def accept(m: Matcher, token: int) -> Optional[str]:
        """Advance a matcher by the sampled `token`: None while generating, "done" when the
        output is complete, "error" when the grammar refused the token (the sample must stop)."""
        if m.failed:   # it gave up on its mask: that row allowed end-of-sequence only
            return "error"
        if not m.accept(token):
            return "error"
        return "done" if m.terminated else None
