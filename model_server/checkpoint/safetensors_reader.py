"""A minimal zero-copy safetensors reader (numpy memmap; bfloat16 and fp8 included)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from model_server.checkpoint.errors import CheckpointError

#: File suffixes of weights (any format): what is not a side file of a checkpoint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2,
}


class SafetensorsFile:
    """Minimal zero-copy safetensors reader (numpy memmap; handles bfloat16)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self._offset = 8 + n
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size > self._offset else None
        #: bytes copied out by `read`, per tensor (per-host shard loading is checked against it)
        self.bytes_read: dict[str, int] = {}

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if self._mmap is None or self._offset + end > self._mmap.shape[0] or \
                end - start != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated or corrupt")
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(dtype).reshape(shape)

    def read(self, name: str, index: tuple) -> np.ndarray:
        """A copy of `tensor[index]` (basic slicing), counted in `bytes_read`: only the pages
        of the memmap under that block are touched."""
        block = np.array(self.get(name)[index])
        self.bytes_read[name] = self.bytes_read.get(name, 0) + block.nbytes
        return block


class SafetensorsDir:
    """All tensors of an HF directory, by name (single file or sharded with an index)."""

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            files: dict[str, SafetensorsFile] = {}
            for tensor, fname in weight_map.items():
                if fname not in files:
                    fpath = root / fname
                    if not fpath.is_file():
                        raise CheckpointError(f"{root}: shard {fname} listed in the index is missing")
                    files[fname] = SafetensorsFile(fpath)
                if tensor not in files[fname].header:
                    raise CheckpointError(f"{root}: tensor {tensor} is not in shard {fname}")
                self.where[tensor] = files[fname]
        else:
            paths = sorted(root.glob("*.safetensors"))
            if not paths:
                others = sorted(p.name for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
                hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
                raise CheckpointError(f"{root}: no *.safetensors weights{hint}")
            for path in paths:
                f = SafetensorsFile(path)
                for tensor in f.keys():
                    self.where[tensor] = f

    def find(self, name: str, prefix: str) -> Optional[str]:
        """The stored name for `name`, allowing a missing or extra family prefix."""
        if name in self.where:
            return name
        if name.startswith(prefix) and name[len(prefix):] in self.where:
            return name[len(prefix):]
        return None
