"""`lm.lora` models: a PEFT adapter served by the engine of its base, a model this server has
LOADED (the override `base` names it).

An adapter is a served model of its own (its own id, status and routes), whose engine is an
`AdapterEngine`: the base's engine with the adapter bound to every request. Loading one reads
its files and registers its weights with the base's engine (host work only: nothing compiles;
the weights reach the device stack when a request first needs them); unloading unregisters
it and never stops the base.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

from model_server.adapters import Adapter, AdapterError, load_adapter
from model_server.engine.types import EngineError, SamplingParams

MODEL_PATH = "lm.lora"


class AdapterEngine:
    """The base's engine, as seen by the adapter's requests (everything else is the base's)."""

    def __init__(self, base: Any, name: str):
        self.base = base
        self.name = name
        self._stopped = False

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.base, attr)

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None):
        return self.base.submit(prompt_ids, params, adapter=self.name)

    def embed(self, prompt_ids: Sequence[int], timeout: Optional[float] = None) -> list[float]:
        return self.base.embed(prompt_ids, timeout, adapter=self.name)

    @property
    def failure(self) -> Optional[str]:
        if self._stopped:
            return "the adapter was unloaded"
        base = self.base.failure
        return None if base is None else f"its base model's engine: {base}"

    @property
    def healthy(self) -> bool:
        return not self._stopped and self.base.healthy

    def stats(self) -> dict:
        """The base's statistics, with this adapter's own running and waiting requests."""
        st = dict(self.base.stats())
        st["running"], st["waiting"], st["requests_total"] = self.base.adapter_requests(self.name)
        return st

    def stop(self) -> None:
        """Stop serving the adapter (the base keeps serving)."""
        self._stopped = True
        self.base.remove_adapter(self.name)


@dataclasses.dataclass
class AdapterModel:
    """What `ServedModel.loaded` holds for an adapter: the base's spec, tokenizer and knobs,
    and the adapter's own size."""

    model_path: str
    checkpoint: str
    base_id: str
    base: Any  # the base's LoadedModel
    adapter: Adapter
    load_seconds: float = 0.0

    spec = property(lambda self: self.base.spec)
    tokenizer = property(lambda self: self.base.tokenizer)
    knobs = property(lambda self: self.base.knobs)
    eos_token_ids = property(lambda self: self.base.eos_token_ids)
    dtype = property(lambda self: self.base.dtype)

    def memory_bytes(self) -> int:
        return self.adapter.nbytes()

    def kv_cache_bytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"load_seconds": round(self.load_seconds, 3), "format": "peft", "base": self.base_id,
                "rank": self.adapter.rank, "lora_alpha": self.adapter.alpha,
                "use_rslora": self.adapter.use_rslora, "target_modules": list(self.adapter.target_modules),
                "memory_bytes": self.memory_bytes()}

    def unload(self) -> None:
        pass


def load(model_id: str, checkpoint: Optional[str], overrides: dict[str, Any], base_served: Any,
         cache_dir: Optional[str], generation: int) -> tuple[AdapterModel, AdapterEngine]:
    """Load adapter `model_id` over `base_served` (a LOADED `ServedModel`); AdapterError if it
    cannot be served there. The base's engine knows it as ``<model_id>@<generation>``, so a new
    generation of the adapter (a rolling update of its checkpoint) can load beside the old one
    on the same base, and unloading the old one leaves the new one (and its cache keys) alone."""
    t0 = time.monotonic()
    base_id = overrides.get("base")
    if checkpoint is None:
        raise AdapterError(f"{MODEL_PATH} needs a checkpoint: the PEFT adapter directory")
    engine, loaded = base_served.engine, base_served.loaded
    if isinstance(engine, AdapterEngine):
        raise AdapterError(f"base {base_id} is itself an adapter")
    if not getattr(engine, "max_loras", 0):
        raise AdapterError(f"base {base_id} was published without LoRA adapters: set its max_loras override")
    adapter = load_adapter(checkpoint, loaded.spec, engine.max_lora_rank, cache_dir=cache_dir)
    name = f"{model_id}@{generation}"
    try:
        engine.add_adapter(name, adapter)
    except (ValueError, EngineError) as e:
        raise AdapterError(str(e)) from e
    model = AdapterModel(MODEL_PATH, checkpoint, str(base_id), loaded, adapter, time.monotonic() - t0)
    return model, AdapterEngine(engine, name)
