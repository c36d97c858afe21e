"""Server-sent events as every streaming endpoint writes them: `data: <json>` frames, then [DONE]."""
from __future__ import annotations

import json
from typing import Any


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
