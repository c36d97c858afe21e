"""Prompt lists fanned out across replicas: one upstream call per prompt, in parallel,
each through the router, reassembled into one answer.

Choice k of prompt i becomes choice i*n + k; usage is summed. Streams are merged
as their events arrive, re-indexed, with one usage chunk (when asked for) and
one `[DONE]` at the end.
"""
from __future__ import annotations

import json
import queue
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from flask import Response

from client.router import RoutedResponse
from http_frontend.errors import FrontendError
from http_frontend.exchange import Exchange
from common.http import hung_up
from http_frontend.upstream import DONE, SSE_HEADERS, Upstream, body_response, broken_stream_event, dumps, sse

MAX_PROMPTS = 1024


def split(body: dict[str, Any], key: str) -> list[Any] | None:
    """The separate prompts (inputs) of a request when there are several of one kind, else None."""
    items = body.get(key)
    if not isinstance(items, list) or len(items) < 2:
        return None
    if all(isinstance(p, str) for p in items) or all(isinstance(p, list) for p in items):
        if len(items) > MAX_PROMPTS:
            raise FrontendError(400, f"at most {MAX_PROMPTS} prompts per request", param=key)
        return items
    return None  # mixed or token ids of one prompt: the replica takes it (or refuses it) whole


def sum_usage(total: dict[str, Any], part: Any) -> None:
    if not isinstance(part, dict):
        return
    for k, v in part.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v
        elif isinstance(v, dict):
            sum_usage(total.setdefault(k, {}), v)


class FanOut:
    def __init__(self, up: Upstream, pool: ThreadPoolExecutor) -> None:
        self.up, self.pool = up, pool

    def _start_all(self, ex: Exchange, model_id: str, path: str, bodies: list[bytes]) -> list[RoutedResponse]:
        """Starts every call in parallel; raises the first routing error (in prompt order)."""
        futures: list[Future] = [self.pool.submit(self.up.call, ex, model_id, path, b) for b in bodies]
        responses, error = [], None
        for f in futures:
            try:
                responses.append(f.result())
            except FrontendError as e:
                error = error or e
        if error is not None:
            raise error  # the started answers close when the exchange finishes
        return responses

    def whole(self, ex: Exchange, model_id: str, path: str, body: dict[str, Any], key: str,
              items: list[Any], merge: Callable[[list[dict[str, Any]]], dict[str, Any]],
              rename: tuple[str, str] | None) -> Response:
        """Non-streaming: all answers, merged; the first refusal (in prompt order) is passed on."""
        bodies = [dumps({**body, key: [p] if key == "input" else p}) for p in items]
        responses = self._start_all(ex, model_id, path, bodies)
        payloads = list(self.pool.map(lambda r: self.up.read(ex, r), responses))
        for r, payload in zip(responses, payloads):
            if r.status_code >= 400:
                return Response(payload, status=r.status_code, content_type=r.headers.get(
                    "Content-Type", "application/json"),
                    headers={k: r.headers[k] for k in ("Retry-After",) if k in r.headers})
        try:
            parts = [json.loads(p) for p in payloads]
            merged = merge(parts)
        except (ValueError, KeyError, TypeError) as e:
            raise FrontendError(502, f"a replica gave an answer that cannot be merged: {e}",
                                code="bad_gateway") from None
        if rename:
            merged["model"] = rename[1]
        return Response(dumps(merged), status=200, content_type="application/json")

    def stream(self, ex: Exchange, model_id: str, path: str, body: dict[str, Any], items: list[Any],
               n: int, rename: tuple[str, str] | None) -> Response:
        """Streaming completions of several prompts: events merged as they come, re-indexed."""
        bodies = [dumps({**body, "prompt": p}) for p in items]
        responses = self._start_all(ex, model_id, path, bodies)
        for r in responses:
            if r.status_code >= 400 or not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                return body_response(ex, self.up, r, None)
        events: queue.Queue = queue.Queue()

        def pump(i: int, resp: RoutedResponse) -> None:
            try:
                for payload in resp.iter_sse():
                    events.put((i, payload))
            except Exception as e:  # noqa: BLE001 - surfaced to the merged stream
                events.put((i, e))
            finally:
                events.put((i, None))

        for i, r in enumerate(responses):
            threading.Thread(target=pump, args=(i, r), daemon=True, name=f"fanout-{ex.rid[:8]}-{i}").start()
        rid = f"cmpl-{uuid.uuid4().hex}"

        def generate() -> Iterator[bytes]:
            open_, usage, first = len(responses), None, None
            try:
                while open_:
                    i, item = events.get()
                    if hung_up(ex.caller):
                        ex.error_kind = "client_disconnect"
                        return
                    if item is None:
                        open_ -= 1
                        continue
                    if isinstance(item, Exception):
                        ex.error_kind = "stream_error"
                        yield broken_stream_event(responses[i].address, item)
                        break
                    chunk = json.loads(item)
                    if "error" in chunk:
                        ex.error_kind = "stream_error"
                        yield sse(chunk)
                        break
                    ex.first_byte()
                    first = first or chunk
                    chunk["id"] = rid
                    if rename:
                        chunk["model"] = rename[1]
                    if not chunk.get("choices") and "usage" in chunk:
                        usage = usage if usage is not None else {}
                        sum_usage(usage, chunk["usage"])
                        continue
                    for c in chunk.get("choices", []):
                        c["index"] = i * n + c.get("index", 0)
                    yield sse(chunk)
                if usage is not None and first is not None and ex.error_kind is None:
                    yield sse({"id": rid, "object": first.get("object", "text_completion"),
                               "created": first.get("created"), "model": first.get("model"),
                               "choices": [], "usage": usage})
                yield DONE
            finally:
                for r in responses:
                    r.abort()  # wakes the pumps; each closes its own answer

        return Response(generate(), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)


def merge_completions(n: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        out = dict(parts[0])
        choices, usage = [], {}
        for i, part in enumerate(parts):
            for c in part["choices"]:
                choices.append({**c, "index": i * n + c.get("index", 0)})
            sum_usage(usage, part.get("usage"))
        out["choices"] = sorted(choices, key=lambda c: c["index"])
        out["usage"] = usage
        return out
    return merge


def merge_embeddings(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(parts[0])
    data, usage = [], {}
    for i, part in enumerate(parts):
        for d in part["data"]:
            data.append({**d, "index": i})
        sum_usage(usage, part.get("usage"))
    out["data"], out["usage"] = data, usage
    return out
