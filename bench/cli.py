"""Command-line flags the engine benchmarks share (prompt and output lengths, concurrency levels,
the prefill chunk and alternating rounds); each benchmark adds its own after these."""
from __future__ import annotations

import argparse


def engine_parser(doc: str | None, *, prompt_tokens: int, prefill_tokens: int, rounds: int,
                  new_tokens: int = 32) -> argparse.ArgumentParser:
    """A parser with the shared flags at this benchmark's defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prefill-tokens", type=int, default=prefill_tokens)
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating rounds; best figure kept")
    return ap
