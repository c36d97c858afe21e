"""Request helpers every part's Flask app uses: JSON bodies parsed strictly, bodies bounded,
and whether the caller of a request hung up."""
from __future__ import annotations

import json
import math
import re
import select
import socket
from typing import Any

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def hung_up(sock: socket.socket | None) -> bool:
    """True once the peer of `sock` closed its side (EOF waiting to be read): under gunicorn,
    `request.environ["gunicorn.socket"]` is the caller's connection."""
    if sock is None:
        return False
    try:
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLRDHUP)
        events = p.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """`json.loads` for request bodies, raising ValueError for anything that is not JSON text:
    also NaN and Infinity (Python's extensions), numbers beyond a double, nesting too deep for
    the parser, and lone UTF-16 surrogate escapes ("\\ud800"), which decode to strings no UTF-8
    text can hold (encoding them later would fail)."""
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("the JSON holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                         "which is not Unicode text") from None
    return data


def read_body(request: Any) -> bytes:
    """A Flask request's body, cached; 413 (RequestEntityTooLarge) past MAX_CONTENT_LENGTH also for
    a chunked body, which werkzeug would otherwise cut at the limit without a word."""
    from werkzeug.exceptions import RequestEntityTooLarge

    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw
