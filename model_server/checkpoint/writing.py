"""Writing checkpoints: Orbax conversions (with the HF side files) and HF directories."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np

from model_server.checkpoint.errors import CheckpointError
from model_server.checkpoint.formats import ORBAX_FORMAT_VERSION, ORBAX_MARKER, ORBAX_PARAMS_DIR, Checkpoint
from model_server.checkpoint.gcs_mirror import MANIFEST
from model_server.checkpoint.safetensors_reader import WEIGHT_SUFFIXES
from model_server.models import base


def side_files(src: Path) -> Iterator[Path]:
    """Config, generation config and tokenizer files of an HF directory (not the weights)."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.endswith(".partial") or p.name in (ORBAX_MARKER, MANIFEST):
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"):
            continue
        yield p


def save_orbax(ckpt: Checkpoint, params: Any, out_dir: str | os.PathLike, dtype: str) -> Path:
    """Write `params` with Orbax plus the HF side files and the format marker into `out_dir`."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if (out / ORBAX_PARAMS_DIR).exists():
        raise CheckpointError(f"{out / ORBAX_PARAMS_DIR} already exists")
    out.mkdir(parents=True, exist_ok=True)
    for p in side_files(ckpt.path):
        shutil.copy2(p, out / p.name)
    # Uncompressed: zstd saves ~5-10% of the bytes of trained or random weights and doubles the
    # restore's CPU time (bench/checkpoint.py); restores read whichever codec a checkpoint has.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(out / ORBAX_PARAMS_DIR, params)
    marker = {"format": "orbax", "version": ORBAX_FORMAT_VERSION, "dtype": dtype,
              "spec": ckpt.spec.to_dict(), "source": ckpt.source}
    (out / ORBAX_MARKER).write_text(json.dumps(marker, indent=2))
    return out


def save_hf(out_dir: str | os.PathLike, spec: base.ModelSpec, params: Any, config: dict,
            generation_config: Optional[dict] = None, dtype: str = "float32") -> Path:
    """Write params as an HF directory (config.json + model.safetensors in `dtype`)."""
    from safetensors.numpy import save_file

    from model_server.models.hfmap import to_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda a: np.asarray(a, base.dtype_of(dtype)), params)
    save_file(to_hf(base.family_class(spec).hf_rules(spec), host), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out
