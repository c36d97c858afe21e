"""Saxml's Python client surface (`sax.pyi`), over HTTP.

    import client.sax as sax
    sax.Publish("/sax/test/lm", "test.tiny", "None", 1)
    sax.WaitForReady("/sax/test/lm", 1)
    lm = sax.Model("/sax/test/lm").LM()
    opts = sax.ModelOptions(); opts.SetExtraInput("temperature", 0.0)
    lm.Generate("hello", opts)   # [(text, score), ...]
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from client import errors
from client.admin import AdminClient
from client.errors import (AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound,  # noqa: F401
                           PermissionDenied, ResourceExhausted, SaxError, Unavailable)
from client.router import Router

_default_lock = threading.Lock()
_defaults: dict[str, Router] = {}


def _router(admin: str | None = None) -> Router:
    """One router (cache, connection pool, watchers) per admin address in this process."""
    client = AdminClient(admin)
    with _default_lock:
        router = _defaults.get(client.url)
        if router is None:
            router = _defaults[client.url] = Router(client)
        return router


# -- admin calls --------------------------------------------------------------------------
def Publish(model_id: str, model_path: str, checkpoint: str | None, num_replicas: int,
            overrides: dict[str, Any] | None = None, *, admin: str | None = None,
            min_replicas: int | None = None, max_replicas: int | None = None,
            idle_seconds: float | None = None) -> None:
    """Publishes a model; `min_replicas <= num_replicas <= max_replicas` bound autoscaling
    (min 0: scale to zero when idle, loaded again by the next call)."""
    AdminClient(admin).publish(model_id, model_path, checkpoint, num_replicas, overrides,
                               min_replicas=min_replicas, max_replicas=max_replicas, idle_seconds=idle_seconds)


def Unpublish(model_id: str, *, admin: str | None = None) -> None:
    AdminClient(admin).unpublish(model_id)


def Update(model_id: str, model_path: str | None = None, checkpoint: str | None = None,
           num_replicas: int | None = None, *, admin: str | None = None, min_replicas: int | None = None,
           max_replicas: int | None = None, idle_seconds: float | None = None) -> None:
    """Changes checkpoint, replicas and/or the autoscaling bounds (model_path, when given,
    must be unchanged)."""
    AdminClient(admin).update(model_id, model_path=model_path, checkpoint=checkpoint, replicas=num_replicas,
                              min_replicas=min_replicas, max_replicas=max_replicas, idle_seconds=idle_seconds)


def List(model_id: str, *, admin: str | None = None) -> tuple[str, str, int]:
    d = AdminClient(admin).model(model_id)
    return d["model_path"], d["checkpoint"], d["active_replicas"]


@dataclass
class ReplicaDetail:
    address: str
    status: str
    generation: int
    error: str | None


@dataclass
class ModelDetail:
    model: str
    model_path: str
    checkpoint: str
    max_replicas: int
    active_replicas: int
    overrides: dict[str, Any]
    last_error: str | None = None
    replicas: list[ReplicaDetail] = field(default_factory=list)
    min_replicas: int = 0
    target_replicas: int = 0
    state: str = ""
    reason: str | None = None     # why a wanted replica is not placed (or the last load error)


def _detail(d: dict[str, Any]) -> ModelDetail:
    return ModelDetail(d["model_id"], d["model_path"], d["checkpoint"], d["max_replicas"], d["active_replicas"],
                       d.get("overrides") or {}, d.get("last_error"),
                       [ReplicaDetail(r["address"], r["status"], r["generation"], r.get("error"))
                        for r in d.get("replicas", [])],
                       d.get("min_replicas", d["max_replicas"]), d.get("target_replicas", d["max_replicas"]),
                       d.get("state", ""), d.get("reason"))


def ListDetail(model_id: str, *, admin: str | None = None) -> ModelDetail:
    return _detail(AdminClient(admin).model(model_id))


def ListAll(cell: str, *, admin: str | None = None) -> list[str]:
    return AdminClient(admin).models(cell)


def Stats(model_id: str | None = None, *, admin: str | None = None) -> dict[str, Any]:
    stats = AdminClient(admin).stats()
    if model_id:
        stats["model"] = AdminClient(admin).model(model_id)
    return stats


def WaitForReady(model_id: str, num_replicas: int, timeout: float = 600.0, *, admin: str | None = None,
                 progress: Callable[[ModelDetail], None] | None = None) -> ModelDetail:
    """Waits until `num_replicas` replicas are ready; raises on timeout, naming the last load error."""
    client = AdminClient(admin)
    deadline = time.monotonic() + timeout
    while True:
        detail = _detail(client.model(model_id))
        if progress:
            progress(detail)
        if detail.active_replicas >= num_replicas:
            return detail
        if time.monotonic() > deadline:
            why = f"; {detail.reason}" if detail.reason else ""
            if detail.last_error and detail.last_error != detail.reason:
                why += f"; last error: {detail.last_error}"
            raise DeadlineExceeded(f"{model_id}: {detail.active_replicas}/{num_replicas} replicas ready "
                                   f"after {timeout:.0f}s{why}")
        time.sleep(0.25)


# -- data calls ---------------------------------------------------------------------------
class ModelOptions:
    """Per-call options: Saxml's extra inputs and a timeout."""

    def __init__(self) -> None:
        self._extra: dict[str, float] = {}
        self._timeout: float | None = None

    def SetExtraInput(self, key: str, value: float) -> None:
        self._extra[key] = float(value)

    def GetExtraInput(self, key: str) -> float | None:
        return self._extra.get(key)

    def SetTimeout(self, seconds: float) -> None:
        self._timeout = float(seconds)

    def GetTimeout(self) -> float | None:
        return self._timeout

    def extra_inputs(self) -> dict[str, float]:
        return dict(self._extra)


@dataclass
class Options:
    """Model-level options (Saxml's Options); `admin` picks the cell's admin server."""
    admin: str | None = None
    timeout: float | None = None


def _call(router: Router, model_id: str, path: str, body: dict[str, Any], timeout: float | None) -> Any:
    with router.post(model_id, path, body, timeout=timeout) as resp:
        payload = resp.json()
        if resp.status_code >= 400:
            raise errors.from_response(resp.status_code, payload)
        return payload


class LanguageModel:
    def __init__(self, model_id: str, options: Options) -> None:
        self.model_id = model_id
        self.options = options
        self.router = _router(options.admin)

    def _timeout(self, options: ModelOptions | None) -> float | None:
        return (options.GetTimeout() if options else None) or self.options.timeout

    def _body(self, options: ModelOptions | None, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model_id, **fields}
        if options is not None and options.extra_inputs():
            body["extra_inputs"] = options.extra_inputs()
        return body

    def Generate(self, text: str, options: ModelOptions | None = None) -> list[tuple[str, float]]:
        payload = _call(self.router, self.model_id, "/lm/generate", self._body(options, text=text),
                        self._timeout(options))
        return [(t, float(s)) for t, s in payload["results"]]

    def GenerateStream(self, text: str, callback: Callable[[list[tuple[str, int, float]]], None] | None = None,
                       options: ModelOptions | None = None) -> Iterator[tuple[str, int, float]] | None:
        """Streams (new text, sample index, score so far). With a callback, calls it for each
        update and returns None (Saxml's style); without, returns an iterator."""
        def events() -> Iterator[tuple[str, int, float]]:
            resp = self.router.post(self.model_id, "/lm/generate_stream", self._body(options, text=text),
                                    stream=True, timeout=self._timeout(options))
            if resp.status_code >= 400:
                raise errors.from_response(resp.status_code, resp.json())
            for payload in resp.iter_sse():
                event = json.loads(payload)
                if "error" in event:
                    raise errors.from_response(500, event)
                yield event["text"], event["index"], float(event["score"])

        if callback is None:
            return events()
        for item in events():
            callback([item])
        return None

    def Score(self, prefix: str, suffixes: list[str], options: ModelOptions | None = None) -> list[float]:
        payload = _call(self.router, self.model_id, "/lm/score",
                        self._body(options, prefix=prefix, suffixes=list(suffixes)), self._timeout(options))
        return [float(s) for s in payload["scores"]]

    def Embed(self, text: str, options: ModelOptions | None = None) -> list[float]:
        return _call(self.router, self.model_id, "/lm/embed", self._body(options, text=text),
                     self._timeout(options))["embedding"]


class Model:
    def __init__(self, model_id: str, options: Options | None = None) -> None:
        self.model_id = model_id
        self.options = options or Options()

    def LM(self) -> LanguageModel:
        return LanguageModel(self.model_id, self.options)
