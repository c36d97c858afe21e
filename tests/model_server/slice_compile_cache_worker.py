"""One rank of a 2-host CPU slice (run by test_slice_compile_cache.py): sets the compilation
cache as `python -m model_server` does, joins through `model_server.slice.initialize`, runs
one sharded program and writes its persistent-cache events (hits, writes)."""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import monitoring

from model_server.__main__ import enable_compilation_cache
from model_server.slice import SliceConfig, initialize


def main(cache: str, coordinator: str, rank: int, out: str) -> None:
    enable_compilation_cache(cache)
    info = initialize(SliceConfig(2, rank, coordinator))
    events: dict[str, int] = {}
    monitoring.register_event_listener(lambda e, **_: events.__setitem__(e, events.get(e, 0) + 1))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp", None))
    w = jax.make_array_from_callback((8, 16), rows, lambda idx: np.ones((8, 16), np.float32)[idx])
    y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(w)
    json.dump({"rank": info.rank, "value": float(np.asarray(y.addressable_shards[0].data)),
               "hits": events.get("/jax/compilation_cache/cache_hits", 0),
               "writes": events.get("/jax/compilation_cache/cache_misses", 0)}, open(out, "w"))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
