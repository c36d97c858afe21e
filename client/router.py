"""Routing a model's calls to its ready replicas.

Locations come from the admin's `locate` and are cached per model; a watcher
thread long-polls the admin and swaps in each new address set as soon as it
changes. While the admin is unreachable the cache keeps serving. Each call
goes to the ready replica with the fewest requests outstanding from this
process (among those with spare capacity, the one that last served the same
leading bytes of a body is preferred: its engine likely holds that prompt prefix
in its KV cache; see `client.affinity`), and is retried on another replica when it fails before any byte of
the answer reached the caller: connection refused or reset, the replica no
longer holds the model, a retryable refusal, or (for an answer read whole with
`RoutedResponse.content()` / `.json()`) a replica that dies between its headers
and the end of its body.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlencode

from client import errors
from client.admin import AdminClient
from client.affinity import AffinityTable, prefix_keys
from client.routed import OnAttempt, RoutedResponse
from client.transport import Answer, Attempt, Caller, CallerGone, RequestsTransport, TimedOut, Transport, TransportError

log = logging.getLogger(__name__)

LONG_POLL_S = 20.0
LOAD_WAIT_S = 300.0      # how long a call waits for an idle model to be loaded for it
DEMAND_EVERY_S = 5.0     # a waiting call renews its demand this often (the leader may change)
SUSPECT_S = 5.0          # a replica that refused a connection is skipped this long
RETRYABLE_CODES = {"model_not_ready", "model_not_found", "queue_full"}
#: A replica with prefix affinity is preferred while it has at most this many more requests
#: outstanding than the least busy one ("spare capacity").
AFFINITY_SLACK = 2


@dataclass
class Location:
    addresses: list[str]
    version: str
    model_path: str
    fetched: float


__all__ = ["Location", "OnAttempt", "RoutedResponse", "Router"]


class Router:
    """`transport` sends each attempt (client.transport; default: RequestsTransport with a pool
    of `pool_size` connections). `load_wait_s`: how long a call for a model with no ready replica
    (scaled to zero, or still loading) waits for one, having asked the admin to load it; then
    Unavailable with a `retry_after`. A call's `caller`, when given, is watched meanwhile: the
    call is given up (errors.Cancelled) once it hangs up."""

    def __init__(self, admin: AdminClient, *, transport: Transport | None = None, max_attempts: int = 3,
                 pool_size: int = 64, load_wait_s: float = LOAD_WAIT_S) -> None:
        self.admin = admin
        self.max_attempts = max_attempts
        self.load_wait_s = load_wait_s
        self.transport: Transport = transport if transport is not None else RequestsTransport(pool_size)
        self._locs: dict[str, Location] = {}
        self._watchers: dict[str, threading.Thread] = {}
        self._outstanding: Counter[str] = Counter()
        self.affinity = AffinityTable()
        self.affinity_hits = 0
        self._suspect: dict[str, float] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = threading.Event()
        self.retries = 0

    # -- locations ----------------------------------------------------------------------
    def location(self, model_id: str) -> Location:
        with self._lock:
            loc = self._locs.get(model_id)
        if loc is None:
            answer = self.admin.locate(model_id)  # NotFound / Unavailable propagate
            loc = self._store(model_id, answer)
            self._watch(model_id)
        return loc

    def _store(self, model_id: str, answer: dict[str, Any]) -> Location:
        loc = Location(list(answer["addresses"]), answer["version"], answer.get("model_path", ""), time.monotonic())
        with self._changed:
            old = self._locs.get(model_id)
            self._locs[model_id] = loc
            if old is None or old.version != loc.version:
                self._changed.notify_all()
        return loc

    def _watch(self, model_id: str) -> None:
        with self._lock:
            if model_id in self._watchers:
                return
            t = threading.Thread(target=self._watch_loop, args=(model_id,), daemon=True,
                                 name=f"sax-watch{model_id}")
            self._watchers[model_id] = t
        t.start()

    def _watch_loop(self, model_id: str) -> None:
        backoff = 0.2
        while not self._closed.is_set():
            with self._lock:
                loc = self._locs.get(model_id)
            try:
                answer = self.admin.locate(model_id, version=loc.version if loc else None, wait_s=LONG_POLL_S)
                self._store(model_id, answer)
                backoff = 0.2
            except errors.NotFound:
                with self._changed:  # unpublished: forget it; the next call asks again
                    self._locs.pop(model_id, None)
                    self._watchers.pop(model_id, None)
                    self._changed.notify_all()
                return
            except errors.SaxError as e:
                log.debug("locate %s failed (serving from cache): %s", model_id, e)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def wait_for_change(self, model_id: str, version: str | None, timeout: float) -> Location | None:
        """Blocks until the cached location of `model_id` has a version other than `version`."""
        self.location(model_id)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                loc = self._locs.get(model_id)
                if loc is None or loc.version != version:
                    return loc
                left = deadline - time.monotonic()
                if left <= 0:
                    return loc
                self._changed.wait(left)

    def wait_for_replica(self, model_id: str, caller: Caller | None = None) -> Location:
        """Asks the admin to load the model and waits up to `load_wait_s` for a ready replica."""
        deadline = time.monotonic() + self.load_wait_s
        renew_at = 0.0
        while True:
            now = time.monotonic()
            if now >= renew_at:
                renew_at = now + DEMAND_EVERY_S
                try:
                    answer = self.admin.demand(model_id)
                except errors.NotFound:
                    raise
                except errors.SaxError as e:  # the admin is out for a moment: wait, ask again
                    log.debug("demand for %s failed: %s", model_id, e)
                else:
                    loc = self._store(model_id, answer)
                    if not loc.addresses and answer.get("loading") is False:
                        raise errors.Unavailable(f"model {model_id} has no ready replica: {answer.get('reason')}")
            loc = self.location(model_id)
            if loc.addresses:
                return loc
            if now >= deadline:
                e = errors.Unavailable(f"model {model_id} has no ready replica: it was not loaded within "
                                       f"{self.load_wait_s:g}s; retry later")
                e.retry_after = max(1.0, min(30.0, self.load_wait_s / 10))  # type: ignore[attr-defined]
                raise e
            if caller is not None and caller.gone():
                raise errors.Cancelled(f"gave up waiting for {model_id}: the caller hung up")
            self.wait_for_change(model_id, loc.version, min(0.5, renew_at - now, max(deadline - now, 0.0)))

    def refresh(self, model_id: str) -> None:
        try:
            self._store(model_id, self.admin.locate(model_id))
        except errors.SaxError:
            pass

    # -- picking --------------------------------------------------------------------------
    def pick(self, model_id: str, exclude: set[str] = frozenset(),  # type: ignore[assignment]
             keys: list[bytes] | None = None, caller: Caller | None = None) -> str:
        """A ready replica: with prefix `keys`, the one that last served the longest run of
        them while it has spare capacity; else the least outstanding."""
        loc = self.location(model_id)
        if not loc.addresses and self.load_wait_s > 0:
            loc = self.wait_for_replica(model_id, caller)
        now = time.monotonic()
        with self._lock:
            candidates = [a for a in loc.addresses if a not in exclude]
            healthy = [a for a in candidates if self._suspect.get(a, 0) < now] or candidates
            if not healthy:
                if loc.addresses:
                    raise errors.Unavailable(f"every replica of {model_id} failed this call")
                raise errors.Unavailable(f"model {model_id} has no ready replica")
            least = min(self._outstanding[a] for a in healthy)
            if keys:
                spare = [a for a in healthy if self._outstanding[a] <= least + AFFINITY_SLACK]
                addr, _ = self.affinity.best(keys, spare)
                if addr is not None:
                    self.affinity_hits += 1
                    return addr
            return random.choice([a for a in healthy if self._outstanding[a] == least])

    def outstanding(self, address: str) -> int:
        with self._lock:
            return self._outstanding[address]

    def _acquire(self, address: str) -> None:
        with self._lock:
            self._outstanding[address] += 1

    def _release(self, address: str) -> None:
        with self._lock:
            self._outstanding[address] -= 1
            if self._outstanding[address] <= 0:
                del self._outstanding[address]

    def _mark_suspect(self, address: str) -> None:
        with self._lock:
            self._suspect[address] = time.monotonic() + SUSPECT_S

    # -- calls ----------------------------------------------------------------------------
    def post(self, model_id: str, path: str, body: Any = None, *, data: bytes | None = None,
             **call: Any) -> RoutedResponse:
        """POSTs `body` (JSON) or raw `data` to a ready replica of `model_id`; see `request`."""
        return self.request("POST", model_id, path, body=body, data=data, **call)

    def get(self, model_id: str, path: str, params: Mapping[str, str] | None = None,
            **call: Any) -> RoutedResponse:
        """A GET on a ready replica of `model_id`; see `request`."""
        return self.request("GET", model_id, path, params=params, **call)

    def request(self, method: str, model_id: str, path: str, *, body: Any = None, data: bytes | None = None,
                params: Mapping[str, str] | None = None, stream: bool = False, timeout: float | None = None,
                headers: Mapping[str, str] | None = None, tried: set[str] | None = None,
                caller: Caller | None = None, on_attempt: OnAttempt | None = None) -> RoutedResponse:
        """Sends the call to a ready replica of `model_id`, retrying on another replica before
        any byte of an answer. The caller must close() the response (or use it as a context
        manager); closing early drops the upstream connection, which cancels the request on the
        replica. `tried`: replicas that already failed this call (they count against
        max_attempts and are not picked again). `caller`: who waits for the answer (given up
        with errors.Cancelled once it hangs up); `on_attempt` hears of every attempt."""
        tried = set(tried or ())
        last_error: errors.SaxError | None = None
        keys = prefix_keys(body, data)
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else b"")
        sent = {"Content-Type": "application/json"} if payload else {}
        sent.update(headers or {})
        query = f"?{urlencode(params)}" if params else ""
        for attempt in range(len(tried), self.max_attempts):
            try:
                address = self.pick(model_id, tried, keys, caller)
            except errors.Unavailable:
                if last_error is None:
                    raise
                # Every replica tried refused or went: one scaled down meanwhile? Wait for one.
                self.refresh(model_id)
                if self.load_wait_s <= 0 or self.location(model_id).addresses:
                    raise last_error from None
                tried.clear()
                address = self.pick(model_id, tried, caller=caller)
            tried.add(address)
            self._acquire(address)
            started = time.perf_counter()
            try:
                resp = self.transport.send(method, f"http://{address}{path}{query}", data=payload, headers=sent,
                                           timeout=(3.0, timeout), stream=stream, caller=caller)
            except TransportError as e:
                # Without stream, the body is read here too: a replica dying mid-answer is
                # still "before any byte reached the caller", so it is retried as well.
                self._release(address)
                if on_attempt is not None:
                    on_attempt(Attempt(address, e.outcome, None))
                if isinstance(e, CallerGone):
                    raise errors.Cancelled(f"{model_id}: the caller hung up") from e
                if isinstance(e, TimedOut):
                    raise errors.DeadlineExceeded(f"{model_id} on {address}: no answer in {timeout}s") from e
                self._mark_suspect(address)
                last_error = errors.Unavailable(f"replica {address} of {model_id} unreachable: {e}")
                self.retries += 1
                self.refresh(model_id)
                continue
            except BaseException:
                self._release(address)
                raise
            if on_attempt is not None:
                on_attempt(Attempt(address, str(resp.status_code), time.perf_counter() - started))
            if resp.status_code in (404, 503) and self._retryable(resp):
                self._release(address)
                last_error = errors.from_response(resp.status_code, _json(resp))
                resp.close()
                self.retries += 1
                if resp.status_code == 404:
                    self.refresh(model_id)
                continue
            self.affinity.served(keys, address)

            def replay(failed: str, on: OnAttempt | None, tried: set[str] = set(tried)) -> RoutedResponse:
                """The same call on another replica (this one broke off its answer)."""
                self._mark_suspect(failed)
                self.retries += 1
                self.refresh(model_id)
                return self.request(method, model_id, path, body=body, data=data, params=params, stream=stream,
                                    timeout=timeout, headers=headers, tried=tried | {failed}, caller=caller,
                                    on_attempt=on)
            return RoutedResponse(resp, address, self._release, replay, on_attempt)
        if last_error is None:
            raise errors.Unavailable(f"every replica of {model_id} failed this call")
        raise last_error

    @staticmethod
    def _retryable(resp: Answer) -> bool:
        body = _json(resp)
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else body.get("code") if isinstance(body, dict) else None
        return code in RETRYABLE_CODES

    def close(self) -> None:
        self._closed.set()
        self.transport.close()


def _json(resp: Answer) -> Any:
    try:
        text = resp.content
    except TransportError as e:
        return {"error": str(e)}
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text[:500].decode("utf-8", "replace")}
