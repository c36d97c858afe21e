"""Which models the frontend serves and under which names.

A request names a model by its Sax id (`/sax/test/lm`), by an alias given to the
frontend (`--alias NAME=ID`), or by the `alias` override it was published with.
The published-model list comes from the admin's detail listing and is reused
for a short while (and kept when the admin cannot be reached).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from client import errors as sax_errors
from client.admin import AdminClient
from http_frontend.errors import FrontendError, from_sax_error, model_not_found

MIN_REFRESH_S = 0.5   # an unknown name forces a refresh at most this often


class Catalog:
    def __init__(self, admin: AdminClient, aliases: dict[str, str], ttl_s: float = 2.0) -> None:
        self.admin = admin
        self.aliases = dict(aliases)
        self.ttl_s = ttl_s
        self._details: list[dict[str, Any]] | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def details(self, max_age: float | None = None) -> list[dict[str, Any]]:
        """The admin's model details, at most `max_age` (default: the TTL) seconds old."""
        max_age = self.ttl_s if max_age is None else max_age
        if self._details is not None and time.monotonic() - self._fetched <= max_age:
            return self._details
        with self._lock:
            if self._details is not None and time.monotonic() - self._fetched <= max_age:
                return self._details
            try:
                self._details = self.admin.models(detail=True)
            except sax_errors.SaxError as e:
                if self._details is None:
                    raise from_sax_error(e) from None
            self._fetched = time.monotonic()  # on failure: keep the stale list for a TTL
            return self._details

    def _published_aliases(self, max_age: float | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for d in self.details(max_age):
            alias = (d.get("overrides") or {}).get("alias")
            if isinstance(alias, str) and alias not in out:
                out[alias] = d["model_id"]
        return out

    def resolve(self, name: Any) -> str:
        """The Sax model id `name` stands for; 400 when it is no string, 404 when unknown."""
        if not isinstance(name, str) or not name:
            raise FrontendError(400, "'model' must be a non-empty string naming a published model",
                                param="model")
        if name in self.aliases:
            return self.aliases[name]
        if name.startswith("/sax/"):
            return name
        model_id = self._published_aliases().get(name)
        if model_id is None and time.monotonic() - self._fetched > MIN_REFRESH_S:
            model_id = self._published_aliases(max_age=MIN_REFRESH_S).get(name)
        if model_id is None:
            raise model_not_found(name)
        return model_id

    def ready(self) -> list[tuple[str, str]]:
        """(name, model id) of every model with a ready replica: ids, then their aliases."""
        return [(name, model_id) for name, model_id, loaded in self.callable() if loaded]

    def callable(self) -> list[tuple[str, str, bool]]:
        """(name, model id, loaded) of every published model that is ready or can be loaded (a
        call for an idle one loads it; max_replicas 0 never can): ids, then their aliases.
        `loaded`: a replica is ready."""
        details = [d for d in self.details() if d.get("active_replicas", 0) > 0 or d.get("max_replicas", 0) > 0]
        loaded = {d["model_id"]: d.get("active_replicas", 0) > 0 for d in details}
        out = [(d["model_id"], d["model_id"], loaded[d["model_id"]]) for d in details]
        seen = set(loaded)
        for d in details:
            alias = (d.get("overrides") or {}).get("alias")
            if isinstance(alias, str) and alias not in seen:
                out.append((alias, d["model_id"], loaded[d["model_id"]]))
                seen.add(alias)
        for name, model_id in self.aliases.items():
            if model_id in loaded and name not in seen:
                out.append((name, model_id, loaded[model_id]))
                seen.add(name)
        return out

    def parent(self, model_id: str) -> str | None:
        """The base model of a LoRA adapter (`lm.lora`, override `base`); None for others."""
        for d in self.details():
            if d.get("model_id") == model_id and d.get("model_path") == "lm.lora":
                base = (d.get("overrides") or {}).get("base")
                return base if isinstance(base, str) else None
        return None

    def default_model(self, configured: str | None) -> str:
        """The model for calls that name none: the configured default, else the only ready one."""
        if configured:
            return self.resolve(configured)
        ready = {model_id for _, model_id in self.ready()}
        if len(ready) == 1:
            return ready.pop()
        raise FrontendError(400, "this call must name a 'model' (the frontend serves "
                                 f"{len(ready)} ready models and has no --default-model)", param="model")
