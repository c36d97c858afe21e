"""Open-loop load generator for the HTTP frontend (or any OpenAI-compatible server).

    python -m bench.load                                    # starts its own cell (admin, model server, frontend)
    python -m bench.load --url http://127.0.0.1:8888 --model /sax/test/lm --rate 20 --duration 30

Requests arrive as a Poisson process at `--rate` per second whatever the server does
(open loop: a slow server builds a queue instead of slowing the generator down, as
real users do). Each is a streaming /v1/completions call with a `--prompt-tokens`
token-id prompt and `--output-tokens` new tokens (`ignore_eos`, so every request
produces exactly that many). Reports throughput, time to first token (TTFT), time
per output token after the first (TPOT), end-to-end latency (p50/p99) and errors
by kind; `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    ttft: float = 0.0              # seconds to the first content event
    tpot: float | None = None      # seconds per token after the first (None for 1-token answers)
    latency: float = 0.0           # seconds to the end of the stream
    tokens: int = 0                # completion tokens (usage, else content events)


@dataclass
class Report:
    offered_rate: float
    duration_s: float
    sent: int
    completed: int
    errors: dict[str, int]
    throughput_rps: float
    output_tok_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


class _Pool:
    """Keep-alive connections to one host, opened on demand and reused when idle."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
        return await asyncio.open_connection(self.host, self.port, limit=1 << 22)

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.append(conn)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the status line")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    """Yields the body's bytes as they arrive (chunked or Content-Length)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def one_request(pool: _Pool, path: str, body: bytes, headers: str, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    conn = None
    try:
        conn = await asyncio.wait_for(pool.get(), timeout)
        reader, writer = conn
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {pool.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        outcome, reusable = await asyncio.wait_for(_stream(reader, t0), timeout)
        if not reusable:
            writer.close()
            conn = None
        return outcome
    except asyncio.TimeoutError:
        conn = None  # the connection is mid-answer: never reuse it
        return Outcome(False, "timeout", latency=time.perf_counter() - t0)
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        conn = None
        return Outcome(False, f"connection: {type(e).__name__}", latency=time.perf_counter() - t0)
    finally:
        if conn is not None:
            pool.put(conn)


async def _stream(reader: asyncio.StreamReader, t0: float) -> tuple[Outcome, bool]:
    """Reads one answer; returns its outcome and whether the connection may be reused."""
    status, headers = await _read_head(reader)
    buf, first, last, events, usage_tokens, error = b"", 0.0, 0.0, 0, None, ""
    async for data in _body_chunks(reader, headers):
        if status != 200:
            buf += data
            continue
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            obj = json.loads(event[6:])
            if "error" in obj:
                error = f"stream error: {obj['error'].get('code') or obj['error'].get('type')}"
                continue
            if obj.get("usage"):
                usage_tokens = obj["usage"].get("completion_tokens")
            if any(c.get("text") for c in obj.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
                events += 1
    end = time.perf_counter()
    reusable = headers.get("connection", "").lower() != "close"
    if status != 200:
        try:
            code = json.loads(buf)["error"].get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            code = None
        return Outcome(False, f"http {status}" + (f" {code}" if code else ""), latency=end - t0), reusable
    if error or not first:
        return Outcome(False, error or "empty answer", latency=end - t0), reusable
    tokens = usage_tokens or events
    return Outcome(True, ttft=first - t0, tpot=(last - first) / (tokens - 1) if tokens > 1 else None,
                   latency=end - t0, tokens=tokens), reusable


async def run_load(url: str, model: str, *, rate: float, duration: float, prompt_tokens: int,
                   output_tokens: int, api_key: str | None = None, temperature: float = 0.0,
                   timeout: float = 120.0, seed: int = 0) -> Report:
    """Poisson arrivals at `rate`/s for `duration` s; waits for every request sent, then reports."""
    rng = random.Random(seed)
    pool = _Pool(url)
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    tasks: list[asyncio.Task[Outcome]] = []
    start = time.perf_counter()
    next_at = start
    while True:
        next_at += rng.expovariate(rate)
        if next_at - start >= duration:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        body = json.dumps({
            "model": model, "prompt": [rng.randrange(3, 256) for _ in range(prompt_tokens)],
            "max_tokens": output_tokens, "ignore_eos": True, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}).encode()
        tasks.append(asyncio.create_task(one_request(pool, "/v1/completions", body, auth, timeout)))
    outcomes = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    pool.close()
    done = [o for o in outcomes if o.ok]
    ms = lambda xs: {"p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3}  # noqa: E731
    return Report(
        offered_rate=rate, duration_s=elapsed, sent=len(outcomes), completed=len(done),
        errors=dict(Counter(o.error for o in outcomes if not o.ok)),
        throughput_rps=len(done) / elapsed, output_tok_s=sum(o.tokens for o in done) / elapsed,
        ttft_ms=ms([o.ttft for o in done]), tpot_ms=ms([o.tpot for o in done if o.tpot is not None]),
        latency_ms=ms([o.latency for o in done]))


def format_report(r: Report) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "none"
    return "\n".join([
        f"offered {r.offered_rate:.1f} req/s for {r.duration_s:.1f} s: sent {r.sent}, completed {r.completed}, "
        f"errors {sum(r.errors.values())} ({errors})",
        f"throughput {r.throughput_rps:.2f} req/s, {r.output_tok_s:.1f} output tok/s",
        "| metric | p50 ms | p99 ms |", "|---|---:|---:|",
        *(f"| {name} | {d['p50']:.1f} | {d['p99']:.1f} |" for name, d in
          (("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("end to end", r.latency_ms)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="frontend URL of an existing cell; none: start a local cell")
    ap.add_argument("--model", default="/sax/bench/lm")
    ap.add_argument("--rate", type=float, default=10.0, help="mean arrivals per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--api-key")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as failed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=32, help="decode slots (own cell only)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    cell = None
    url = args.url
    if not url:
        from bench.frontend import LocalCell

        print("starting a local cell (admin, model server, frontend)...", file=sys.stderr)
        cell = LocalCell(workers=1, slots=args.slots)
        url = cell.frontend
    try:
        report = asyncio.run(run_load(
            url.rstrip("/"), args.model, rate=args.rate, duration=args.duration,
            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, api_key=args.api_key,
            temperature=args.temperature, timeout=args.timeout, seed=args.seed))
    finally:
        if cell is not None:
            cell.stop()
    print(json.dumps(asdict(report)) if args.json else format_report(report))


if __name__ == "__main__":
    main()
