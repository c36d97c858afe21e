"""Load generators and bookkeeping for the fault suites.

`Load` runs client threads sending non-streaming completions until stopped and keeps
every outcome; `StreamLoad` keeps streams going and records how each one ended; `record`
prints a measured figure (run `pytest -s` to see them as they come; the terminal summary
lists them all at the end either way).
"""
from __future__ import annotations

import abc
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

FIGURES: list[str] = []


def record(name: str, value: Any, unit: str = "") -> None:
    """Notes a measured figure (printed now, and again in the terminal summary)."""
    if isinstance(value, float):
        value = f"{value:.2f}"
    line = f"{name} = {value}{(' ' + unit) if unit else ''}"
    FIGURES.append(line)
    print(f"[fault figure] {line}", flush=True)


def admin_get(admin_url: str, path: str, timeout: float = 10) -> Any:
    r = requests.get(admin_url + path, timeout=timeout)
    r.raise_for_status()
    return r.json()


def locate(admin_url: str, model_id: str) -> list[str]:
    """The addresses the admin routes `model_id` to (LOADED replicas on live servers)."""
    return admin_get(admin_url, f"/locate{model_id}")["addresses"]


def publish(admin_url: str, model_id: str, replicas: int, *, model_path: str = "test.tiny",
            checkpoint: str = "None", overrides: dict[str, Any] | None = None,
            timeout: float = 15) -> requests.Response:
    return requests.post(f"{admin_url}/models", timeout=timeout, json={
        "model_id": model_id, "model_path": model_path, "checkpoint": checkpoint, "replicas": replicas,
        "overrides": overrides or {}})


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ClientThreads(abc.ABC):
    """`clients` daemon threads running `_run` until `_stop` is set."""

    def __init__(self, clients: int, name: str) -> None:
        self.clients, self._name = clients, name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self):  # type: ignore[no-untyped-def]
        for i in range(self.clients):
            t = threading.Thread(target=self._run, name=f"{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @abc.abstractmethod
    def _run(self) -> None:
        """One client's loop."""

    def _join(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), what


class Load(ClientThreads):
    """`clients` threads, each sending one non-streaming completion after another through
    `url` until stop(); every outcome is kept (`failures` lists the bad ones).

    The client threads run at a lower CPU priority (`nice`): on a two-core machine closed-loop
    clients would otherwise take the CPU the cell needs to recover (load a new replica)."""

    def __init__(self, url: str, model: str, *, clients: int = 32, max_tokens: int = 4,
                 timeout: float = 60.0, prompt: str = "Once upon a time", nice: int = 10) -> None:
        super().__init__(clients, "load")
        self.url, self.model, self.nice = url, model, nice
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        self.timeout = timeout
        self.outcomes: list[Outcome] = []

    def _run(self) -> None:
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)  # this thread only
            except OSError:
                pass
        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.monotonic()
            status, error = None, None
            try:
                r = session.post(f"{self.url}/v1/completions", json=self.body, timeout=(10, self.timeout))
                status = r.status_code
                if status != 200:
                    error = f"HTTP {status}: {r.text[:300]}"
                elif not r.json().get("choices"):
                    error = f"no choices: {r.text[:300]}"
            except Exception as e:  # noqa: BLE001 - every failure counts
                error = f"{type(e).__name__}: {e}"
            with self._lock:
                self.outcomes.append(Outcome(t0, time.monotonic(), status, error))
            if error:
                time.sleep(0.05)  # no hot loop on a persistent failure
        session.close()

    def stop(self) -> "Load":
        self._stop.set()
        self._join(self.timeout + 15, "a load client hung")
        return self

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def ok_count(self, since: float = 0.0) -> int:
        return sum(1 for o in self.snapshot() if o.ok and o.started >= since)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def summary(self) -> str:
        outs = self.snapshot()
        bad = [o for o in outs if not o.ok]
        return f"{len(outs)} requests, {len(bad)} failed" + (f": {[o.error for o in bad[:5]]}" if bad else "")


@dataclass
class Stream:
    started: float
    events: list[tuple[float, Any]] = field(default_factory=list)   # (arrival, decoded payload)
    first_event: float | None = None
    last_event: float | None = None
    end: str | None = None        # "done" (a finish_reason, then [DONE]), "error" (error event, then [DONE]),
                                  # or "broken: ..." (anything else)
    ended_at: float | None = None

    @property
    def in_progress(self) -> bool:
        return self.first_event is not None and self.end is None

    def error_event(self) -> Any:
        return next((p for _, p in self.events if isinstance(p, dict) and "error" in p), None)


class StreamLoad(ClientThreads):
    """`clients` threads, each running one streaming completion after another (long ones:
    `max_tokens` with ignore_eos) and recording every event with its arrival time."""

    def __init__(self, url: str, model: str, *, clients: int = 6, max_tokens: int = 100,
                 read_timeout: float = 30.0) -> None:
        super().__init__(clients, "stream")
        self.url = url
        self.body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                     "ignore_eos": True, "temperature": 0.0, "stream": True}
        self.read_timeout = read_timeout
        self.streams: list[Stream] = []

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            s = Stream(time.monotonic())
            with self._lock:
                self.streams.append(s)
            self._one(session, s)
            s.ended_at = time.monotonic()
        session.close()

    def _one(self, session: requests.Session, s: Stream) -> None:
        try:
            # The read timeout bounds every wait for the next bytes: a stream never hangs the test.
            with session.post(f"{self.url}/v1/completions", json=self.body, stream=True,
                              timeout=(10, self.read_timeout)) as r:
                if r.status_code != 200:
                    s.end = f"broken: HTTP {r.status_code} {r.text[:200]}"
                    return
                finished = False
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    now = time.monotonic()
                    payload = line[6:]
                    decoded = "[DONE]" if payload == b"[DONE]" else json.loads(payload)
                    s.events.append((now, decoded))
                    s.first_event = s.first_event or now
                    s.last_event = now
                    if decoded == "[DONE]":
                        err = s.error_event()
                        s.end = "error" if err is not None else ("done" if finished else "broken: no finish_reason")
                        return
                    if isinstance(decoded, dict) and "error" not in decoded:
                        finished = finished or any(c.get("finish_reason") for c in decoded.get("choices", []))
                s.end = "broken: ended without [DONE]"
        except Exception as e:  # noqa: BLE001
            s.end = f"broken: {type(e).__name__}: {e}"

    def stop_starting(self) -> None:
        """Lets every client finish the stream it is on, then stop."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._join(timeout, "a stream did not end in time")

    def snapshot(self) -> list[Stream]:
        with self._lock:
            return list(self.streams)
