"""Output handling: token ids to text deltas (incremental detokenization, stop strings and
stop tokens held back and cut), logprob records, latency histograms."""
from __future__ import annotations

from typing import Optional

from model_server.engine import metrics
from model_server.engine.requests import Request, Sequence
from model_server.engine.types import Delta, TokenLogprob


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self.h_ttft = metrics.Histogram(metrics.TTFT_BUCKETS)
        self.h_tpot = metrics.Histogram(metrics.TPOT_BUCKETS)

    def piece(self, tid: int) -> str:
        """A token's text decoded alone (cached)."""
        p = self._pieces.get(tid)
        if p is None:
            p = self.tokenizer.decode([tid], skip_special_tokens=False)
            self._pieces[tid] = p
        return p

    def logprob(self, tok: int, chosen: float, top_ids, top_lps, k: int) -> TokenLogprob:
        return TokenLogprob(tok, self.piece(tok), float(chosen),
                            [(int(top_ids[m]), self.piece(int(top_ids[m])), float(top_lps[m])) for m in range(k)])

    def prompt_logprobs(self, r: Request, chosen, top_ids, top_lps) -> list[Optional[TokenLogprob]]:
        """Each prompt token's logprob given its prefix (the first has none) from a scoring
        pass's rows: chosen [T], top ids / logprobs [T, k]."""
        k = r.params.logprobs or 0
        lps: list[Optional[TokenLogprob]] = [None]
        for j in range(1, len(r.prompt)):
            lps.append(self.logprob(r.prompt[j], chosen[j - 1], top_ids[j - 1], top_lps[j - 1], k))
        return lps

    def start(self, s: Sequence) -> None:
        """Before a sequence's first token: its detokenizer, primed with the prompt."""
        if s.detok is None:
            s.detok = self.tokenizer.detokenizer(s.req.prompt)
            s.last_time = s.req.admitted

    def on_token(self, s: Sequence, tok: int, tlp: Optional[TokenLogprob], now: float) -> Optional[str]:
        """Record one generated token; emits a Delta when there is text (or the end); returns
        the finish reason ("stop", "length") or None."""
        r, p = s.req, s.req.params
        s.generated += 1
        s.tokens.append(tok)
        r.handle.completion_tokens += 1
        if s.generated == 1:
            if not r.first_token:
                r.first_token = now
                self.h_ttft.observe(now - r.arrival)
        else:
            self.h_tpot.observe(now - s.last_time)
        s.last_time = now
        s.pending_ids.append(tok)
        if tlp is not None:
            s.pending_lps.append(tlp)
        finish = None
        if tok in r.stop_ids:
            finish = "stop"
            new = s.detok.flush()
        elif s.grammar_end == "done":  # the output is complete: nothing but end-of-sequence may follow
            finish = "stop"
            new = s.detok.add(tok) + s.detok.flush()
        elif s.grammar_end == "error":  # a token outside the grammar is never emitted
            finish = "stop"
            new = s.detok.flush()
        else:
            new = s.detok.add(tok)
            if s.generated >= p.max_tokens:
                finish = "length"
                new += s.detok.flush()
        text = s.held + new
        s.held = ""
        stops = [x for x in p.stop if x]
        if stops and text:
            cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif finish is None:
                hold = 0
                for x in stops:
                    for k in range(min(len(x) - 1, len(text)), hold, -1):
                        if text.endswith(x[:k]):
                            hold = k
                            break
                if hold:
                    text, s.held = text[:-hold], text[-hold:]
        if text or finish is not None:
            r.handle._put(Delta(s.index, text, s.pending_ids, s.pending_lps, finish))
            s.pending_ids, s.pending_lps = [], []
        return finish
