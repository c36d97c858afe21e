"""What a new user meets first: the probes vLLM-compatible tools send (guidellm probes
`GET /health`), and stream errors worded for users, not naming internal classes."""
from __future__ import annotations

import re

import pytest
import requests

from tests.cluster import sse_events
from tests.frontend.conftest import Cell


@pytest.mark.parametrize("target", ["frontend", "model-server"])
def test_vllm_probes(cell: Cell, target: str) -> None:
    base = cell.url if target == "frontend" else cell.model_server_urls[0]
    for method, path in (("get", "/health"), ("get", "/ping"), ("post", "/ping")):
        r = requests.request(method, base + path, timeout=10)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code, r.text)
    version = requests.get(base + "/version", timeout=10)
    assert version.status_code == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", version.json()["version"])


def test_secured_frontend_answers_probes_without_a_key(cell: Cell) -> None:
    for path in ("/health", "/ping", "/version"):
        assert requests.get(cell.secure.url + path, timeout=10).status_code == 200, path


def test_a_broken_stream_says_what_happened_in_words(cell: Cell) -> None:
    body = {"model": "/sax/test/fake", "prompt": "break", "stream": True}
    events = sse_events(requests.post(f"{cell.url}/v1/completions", json=body, stream=True, timeout=30))
    error = events[2]["error"]
    assert error["code"] == "stream_error" and events[3] == "[DONE]"
    message = error["message"]
    assert "cut off" in message and "again" in message, message
    # No exception class names (BadAnswer, ChunkedEncodingError, ...) and no replica addresses.
    assert not re.search(r"[A-Z][a-z]+[A-Z]\w*(Error|Answer|Exception)?|\d+\.\d+\.\d+\.\d+:\d+", message), message
