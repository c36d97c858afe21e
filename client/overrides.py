"""`KEY=JSON` override arguments of the command line (`saxutil publish`, `saxutil up --override`)."""
from __future__ import annotations

import json
from typing import Any, Iterable

import click


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`("num_slots=4", "dtype=bfloat16")` -> `{"num_slots": 4, "dtype": "bfloat16"}`; a value that
    is not JSON stays a string, as Saxml accepts. The admin validates the keys and values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=JSON, got {pair!r}", param_hint="OVERRIDES")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
