"""The models this server holds: background loads, unloads, status reports, name lookup.

Models are keyed by (model id, generation): during a rolling update the admin
may ask for a new generation while the old one still serves. Requests name a
model by id or alias and get its newest LOADED generation.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # the engine and registry import JAX: only where a model loads
    from model_server.engine import Engine
    from model_server.registry import LoadedModel

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED, UNLOADING = "LOADING", "LOADED", "FAILED", "UNLOADING"
Key = tuple[str, int]
#: (model_path, checkpoint, overrides, cache_dir) -> the loaded model and its started engine.
Loader = Callable[[str, Optional[str], dict[str, Any], Optional[str]], tuple["LoadedModel", "Engine"]]


class ModelNotFound(LookupError):
    pass


class ModelNotReady(RuntimeError):
    pass


@dataclass
class ServedModel:
    model_id: str
    generation: int
    model_path: str
    checkpoint: str | None
    overrides: dict[str, Any]
    status: str = LOADING
    error: str | None = None
    engine: Optional["Engine"] = None          # once loaded
    loaded: Optional["LoadedModel"] = None     # once loaded
    load_time_s: float | None = None
    memory_bytes: int | None = None
    kv_cache_bytes: int | None = None  # the KV block pool's share of memory_bytes
    static: bool = False
    started: float = field(default_factory=time.monotonic)
    progress: str | None = None  # while LOADING: what the load is doing (model_server.load_progress)
    # When it last had a request (monotonic), and the engine's request count then.
    last_used: float = field(default_factory=time.monotonic)
    _requests_seen: int = 0

    @property
    def alias(self) -> str | None:
        return self.overrides.get("alias")

    def check_engine(self) -> str:
        """The status, after turning a LOADED model whose engine loop died into FAILED: the admin
        then places the replica elsewhere (and the error shows), instead of routing to a
        replica that refuses everything."""
        failure = self.engine.failure if self.status == LOADED and self.engine is not None else None
        if failure:
            log.error("%s generation %d: engine failed: %s", self.model_id, self.generation, failure)
            self.status, self.error = FAILED, f"the engine failed: {failure}"
        return self.status

    def load(self) -> dict[str, Any]:
        """Requests running and queued, and seconds since the last one (the admin autoscales
        and evicts least-recently-used replicas from these)."""
        if self.status != LOADED or self.engine is None:
            return {}
        st = self.engine.stats()
        now = time.monotonic()
        running, waiting = int(st.get("running", 0)), int(st.get("waiting", 0))
        if running or waiting or st.get("requests_total", 0) != self._requests_seen:
            self._requests_seen, self.last_used = st.get("requests_total", 0), now
        return {"running": running, "waiting": waiting, "idle_s": round(now - self.last_used, 1)}

    def report(self) -> dict[str, Any]:
        self.check_engine()
        return {"model_id": self.model_id, "generation": self.generation, "status": self.status,
                "checkpoint": self.checkpoint if self.checkpoint is not None else "None",
                "error": self.error, "memory_bytes": self.memory_bytes, "load_time_s": self.load_time_s,
                "kv_cache_bytes": self.kv_cache_bytes, **self.load(),
                **({"progress": self.progress} if self.status == LOADING and self.progress else {})}


def build_engine(model_path: str, checkpoint: str | None, overrides: dict[str, Any], cache_dir: str | None,
                 engine_cls: Any = None) -> tuple["LoadedModel", "Engine"]:
    """Loads weights and tokenizer and builds the engine (not started: nothing compiled yet)."""
    from model_server import registry
    from model_server.devices import make_mesh
    from model_server.engine import Engine
    from model_server.load_progress import CURRENT, CompileProgress

    sink = CURRENT.get()
    if sink is not None:
        sink("loading weights")
    loaded = registry.load_model(model_path, checkpoint, overrides, mesh=make_mesh(), cache_dir=cache_dir)
    k = loaded.knobs
    engine = (engine_cls or Engine)(
        loaded, num_slots=k.num_slots, max_seq_len=k.max_seq_len, prefill_buckets=list(k.prefill_buckets),
        max_queue=k.max_queue, dtype=k.dtype, block_size=k.block_size, num_blocks=loaded.num_blocks(),
        max_num_batched_tokens=k.max_num_batched_tokens, enable_prefix_caching=k.enable_prefix_caching,
        max_queue_wait_s=k.max_queue_wait_s, max_loras=k.max_loras, max_lora_rank=k.max_lora_rank,
        kv_cache_dtype=k.kv_cache_dtype)
    engine.compile_progress = CompileProgress(model_path, sink)
    return loaded, engine


def default_loader(model_path: str, checkpoint: str | None, overrides: dict[str, Any],
                   cache_dir: str | None) -> tuple["LoadedModel", "Engine"]:
    """Loads weights and tokenizer, builds the engine and compiles every shape."""
    loaded, engine = build_engine(model_path, checkpoint, overrides, cache_dir)
    engine.start()
    return loaded, engine


class ModelManager:
    def __init__(self, *, cache_dir: str | None = None,
                 loader: Loader = default_loader,
                 drain_timeout_s: float = 30.0) -> None:
        self._models: dict[Key, ServedModel] = {}
        self._lock = threading.Lock()
        # One load at a time: loads compete for memory and compile threads.
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sax-load")
        self._unloads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sax-unload")
        # Adapters load beside (not behind) models: host work only, under a second.
        self._adapter_loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sax-adapter")
        self._loader = loader
        self._cache_dir = cache_dir
        self._drain_timeout_s = drain_timeout_s

    # -- convergence -------------------------------------------------------------------
    def ensure(self, model_id: str, generation: int, model_path: str, checkpoint: str | None,
               overrides: dict[str, Any] | None = None, *, static: bool = False) -> ServedModel:
        key = (model_id, generation)
        with self._lock:
            existing = self._models.get(key)
            if existing is not None:
                return existing
            served = ServedModel(model_id, generation, model_path,
                                 None if checkpoint in (None, "None") else checkpoint,
                                 dict(overrides or {}), static=static)
            self._models[key] = served
        (self._adapter_loads if model_path == "lm.lora" else self._loads).submit(self._load, served)
        return served

    def converge(self, desired: list[dict[str, Any]]) -> None:
        """Loads what the admin wants and unloads what it no longer does (static models stay)."""
        wanted = {(d["model_id"], int(d["generation"])) for d in desired}
        for d in desired:
            self.ensure(d["model_id"], int(d["generation"]), d["model_path"], d.get("checkpoint"),
                        d.get("overrides"))
        with self._lock:
            gone = [m for k, m in self._models.items()
                    if k not in wanted and not m.static and m.status != UNLOADING]
            for m in gone:
                if m.status in (LOADED, FAILED):
                    m.status = UNLOADING
        for m in gone:
            if m.status == UNLOADING:
                self._unloads.submit(self._unload, m)
            # A model still LOADING is unloaded by _load when it finishes.

    def _load(self, served: ServedModel) -> None:
        t0 = time.monotonic()
        log.info("loading %s generation %d (%s, %s)", served.model_id, served.generation,
                 served.model_path, served.checkpoint)
        from model_server.load_progress import CURRENT

        token = CURRENT.set(lambda line: setattr(served, "progress", line))
        try:
            if served.model_path == "lm.lora":
                loaded, engine = self._load_adapter(served)
            else:
                loaded, engine = self._loader(served.model_path, served.checkpoint, served.overrides,
                                              self._cache_dir)
        except Exception as e:  # any load failure is reported to the admin, never fatal
            log.exception("loading %s failed", served.model_id)
            served.error = f"{type(e).__name__}: {e}"
            served.status = FAILED
            return
        finally:
            CURRENT.reset(token)
        served.loaded, served.engine = loaded, engine
        served.last_used = time.monotonic()
        served.load_time_s = round(time.monotonic() - t0, 3)
        served.memory_bytes = int(loaded.memory_bytes()) if hasattr(loaded, "memory_bytes") else None
        served.kv_cache_bytes = int(loaded.kv_cache_bytes()) if hasattr(loaded, "kv_cache_bytes") else None
        with self._lock:
            still_wanted = self._models.get((served.model_id, served.generation)) is served
            served.status = LOADED if still_wanted else UNLOADING
        log.info("loaded %s generation %d in %.2fs", served.model_id, served.generation, served.load_time_s)
        if not still_wanted:
            self._unload(served)

    def _load_adapter(self, served: ServedModel) -> tuple[Any, Any]:
        """An `lm.lora` adapter over its base, which must be LOADED here (the admin places
        adapters only beside a loaded replica of their base)."""
        from model_server import lora_model

        base_id = served.overrides.get("base")
        if not isinstance(base_id, str):
            raise ValueError("lm.lora needs the override 'base': the model id of its base model")
        try:
            base = self.resolve(base_id)
        except (ModelNotFound, ModelNotReady) as e:
            raise RuntimeError(f"base model {base_id} is not loaded on this server: {e}") from None
        return lora_model.load(served.model_id, served.checkpoint, served.overrides, base, self._cache_dir,
                               generation=served.generation)

    def _unload(self, served: ServedModel) -> None:
        """Stops routing to the model, lets in-flight requests finish (bounded), frees memory."""
        served.status = UNLOADING
        engine = served.engine
        if engine is not None:
            deadline = time.monotonic() + self._drain_timeout_s
            while time.monotonic() < deadline:
                st = engine.stats()
                if not st.get("running") and not st.get("waiting"):
                    break
                time.sleep(0.05)
            engine.stop()
        if served.loaded is not None and hasattr(served.loaded, "unload"):
            served.loaded.unload()
        served.engine = served.loaded = None
        with self._lock:
            if self._models.get((served.model_id, served.generation)) is served:
                del self._models[(served.model_id, served.generation)]
        log.info("unloaded %s generation %d", served.model_id, served.generation)

    # -- lookups -----------------------------------------------------------------------
    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.report() for m in self._models.values()]

    def all(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def resolve(self, name: Any) -> ServedModel:
        """The newest LOADED generation of the model named by id or alias."""
        if not isinstance(name, str) or not name:
            raise ModelNotFound("request needs a 'model'")
        with self._lock:
            matches = [m for m in self._models.values() if m.model_id == name or m.alias == name]
        if not matches:
            raise ModelNotFound(f"model {name} is not served here")
        ready = [m for m in matches if m.check_engine() == LOADED]
        if not ready:
            states = ", ".join(sorted({m.status for m in matches}))
            raise ModelNotReady(f"model {name} is not ready ({states})")
        return max(ready, key=lambda m: m.generation)

    def shutdown(self) -> None:
        self._loads.shutdown(wait=False, cancel_futures=True)
        for m in self.all():
            if m.engine is not None:
                m.engine.stop()
