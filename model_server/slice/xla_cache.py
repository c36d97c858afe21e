"""The persistent XLA compilation cache on every rank of a slice, not only rank 0.

Every rank uses the same setting (`SAX_COMPILATION_CACHE`, enabled by `python -m model_server`
before `initialize`), but JAX writes persistent cache entries only from process 0, expecting
the others to read them from a shared directory. The key hashes the devices' topology, which
differs per process where the backend's topology is per process (CPU: each process its own
devices), and a follower's directory is its own host's anyway (a pod's volume): so a follower
never found an entry, wrote none, and compiled every program again on each restart.

`write_on_this_rank` makes a follower write its own entries as rank 0 does (JAX's own
thresholds: no host callbacks, `jax_persistent_cache_min_compile_time_secs`, the minimum entry
size); reads are JAX's, unchanged. It replaces the private `jax._src.compiler._cache_write`,
checked by signature: a JAX whose function differs is left alone, with a warning.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)

_PARAMS = ["cache_key", "compile_time_secs", "module_name", "backend", "executable", "host_callbacks"]


def write_on_this_rank() -> bool:
    """Let this (non-zero) process write persistent cache entries; False where JAX's private
    hook is not the one this was written against (then nothing changes)."""
    from jax._src import compilation_cache, compiler, config

    current = getattr(compiler, "_cache_write", None)
    if getattr(current, "saxplane_every_rank", False):
        return True
    if current is None or list(inspect.signature(current).parameters) != _PARAMS:
        log.warning("this JAX's compiler._cache_write is not the expected one: followers will not "
                    "write persistent compilation cache entries")
        return False

    def cache_write(cache_key: str, compile_time_secs: float, module_name: str, backend: Any,
                    executable: Any, host_callbacks: Sequence[Any]) -> None:
        if host_callbacks or compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
            return
        try:
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))
        except Exception as e:  # as JAX: a cache that cannot be written only costs a compile
            log.warning("cannot write the compilation cache entry of %s: %s: %s", module_name,
                        type(e).__name__, e)

    cache_write.saxplane_every_rank = True  # type: ignore[attr-defined]
    compiler._cache_write = cache_write
    return True
