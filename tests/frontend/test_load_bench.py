"""bench/load.py and bench/frontend.py's closed loop against the real frontend: figures are
measured, errors are counted by kind or raised."""
from __future__ import annotations

import asyncio
import json
import math

import pytest

from bench import frontend as frontend_bench
from bench.load import format_report, run_load
from tests.frontend.conftest import API_KEYS, MODEL, Cell

pytestmark = pytest.mark.slow


def test_open_loop_load_reports_throughput_ttft_tpot(cell: Cell) -> None:
    report = asyncio.run(run_load(cell.url, MODEL, rate=20, duration=2.0, prompt_tokens=8, output_tokens=5,
                                  timeout=60))
    assert report.sent >= 15 and report.errors == {} and report.completed == report.sent
    # ignore_eos: every request generated exactly the tokens asked for.
    assert math.isclose(report.output_tok_s * report.duration_s, 5 * report.sent, rel_tol=1e-6)
    for figures in (report.ttft_ms, report.tpot_ms, report.latency_ms):
        assert 0 < figures["p50"] <= figures["p99"]
    assert report.ttft_ms["p50"] < report.latency_ms["p50"]
    text = format_report(report)
    assert "TTFT" in text and "TPOT" in text and "errors 0" in text


def test_refusals_are_counted_as_errors_by_kind(cell: Cell) -> None:
    missing = asyncio.run(run_load(cell.url, "/sax/test/nosuch", rate=20, duration=1.0, prompt_tokens=4,
                                   output_tokens=2, timeout=30))
    assert missing.completed == 0 and missing.errors == {"http 404 model_not_found": missing.sent}
    # The locked-down frontend: no key is a 401 per request; the right key is served.
    locked = asyncio.run(run_load(cell.secure.url, MODEL, rate=10, duration=1.0, prompt_tokens=4,
                                  output_tokens=2, timeout=30))
    assert locked.completed == 0 and set(locked.errors) == {"http 401 invalid_api_key"}
    keyed = asyncio.run(run_load(cell.secure.url, MODEL, rate=3, duration=1.5, prompt_tokens=4,
                                 output_tokens=2, timeout=30, api_key=API_KEYS[0]))
    assert keyed.sent > 0 and keyed.completed == keyed.sent, keyed.errors


def test_frontend_bench_closed_loop_on_keep_alive_connections(cell: Cell) -> None:
    """bench.frontend's lean load generator: several answers per connection, each framed by its
    Content-Length; a refusal stops the run with the server's answer."""
    body = json.dumps({"model": MODEL, "prompt": "Hello world", "max_tokens": 2, "temperature": 0}).encode()
    done, latencies, elapsed, cpu = frontend_bench.run_load(cell.url, body, clients=3, seconds=1.0)
    assert done == len(latencies) >= 6 and all(0 < t < elapsed for t in latencies) and cpu > 0
    poster = frontend_bench.Poster(cell.url, "/v1/completions", body)
    try:
        answers = [poster.post() for _ in range(3)]
    finally:
        poster.close()
    assert [status for status, _ in answers] == [200] * 3
    assert all(json.loads(data)["usage"]["completion_tokens"] == 2 for _, data in answers)
    missing = json.dumps({"model": "/sax/test/nosuch", "prompt": "Hi", "max_tokens": 1}).encode()
    with pytest.raises(RuntimeError, match="404"):
        frontend_bench.run_load(cell.url, missing, clients=2, seconds=0.5)
