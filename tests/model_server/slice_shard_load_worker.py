"""One host of a 2-host CPU slice (run by test_slice_shard_load.py): loads a checkpoint (HF or
Orbax) over the slice's 4-device mesh and writes what it read (bytes per safetensors tensor)
and its shards' values."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from model_server import checkpoint as ck
from model_server.checkpoint import loading
from model_server.models import base


def main(ckpt_dir: str, coordinator: str, rank: int, quantization: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, 2, rank)
    ckpt = ck.open_checkpoint(ckpt_dir)
    mesh = base.make_mesh(jax.devices())
    files: list = []
    orig = loading.SafetensorsDir

    def recording(path):  # keep the reader loading uses, to read its counters afterwards
        d = orig(path)
        files.append(d)
        return d
    loading.SafetensorsDir = recording
    params = ck.load_params(ckpt, "float32", mesh=mesh, quantization=quantization or None)
    where = files[0].where if files else {}  # none for an Orbax checkpoint
    read = {name: f.bytes_read.get(name, 0) for name, f in where.items()}
    stored = {name: f.get(name).nbytes for name, f in where.items()}
    shards = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        shards[key] = [[[[s.start, s.stop] for s in _idx(sh.index, leaf.shape)],
                        np.asarray(sh.data).tolist()] for sh in leaf.addressable_shards]
    json.dump({"bytes_read": read, "stored": stored, "shards": shards,
               "local_devices": jax.local_device_count(), "devices": jax.device_count()},
              open(out, "w"))
    jax.distributed.shutdown()


def _idx(index, shape):
    return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
