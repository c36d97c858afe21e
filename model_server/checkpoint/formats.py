"""Format detection: a checkpoint directory is a Hugging Face one or our Orbax conversion.

* HF directory: config.json, model.safetensors or sharded ``*.safetensors`` with
  ``model.safetensors.index.json``, tokenizer files, optional generation_config.json.
* Orbax (written by ``python -m model_server.convert``): the HF json/tokenizer files plus
  ``saxplane.json`` (format marker) and ``params/`` (an Orbax StandardCheckpointer tree).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from common import gcs
from model_server.checkpoint.errors import CheckpointError
from model_server.checkpoint.gcs_mirror import resolve_local, split_gcs
from model_server.models import base

ORBAX_MARKER = "saxplane.json"
ORBAX_PARAMS_DIR = "params"
#: 2: matrices [out, in] (torch Linear's layout); 1 held them [in, out].
ORBAX_FORMAT_VERSION = 2


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint resolved to a local directory, with its spec (params not loaded yet)."""

    source: str  # what the user gave (local path or gs:// URI)
    path: Path  # local directory
    format: str  # "hf" | "orbax"
    spec: base.ModelSpec
    hf_config: dict
    stored_dtype: Optional[str] = None  # orbax: dtype the params were saved in


def _read_json(path: Path, required: bool = True) -> Optional[dict]:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path.parent}: missing {path.name}")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def open_checkpoint(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Resolve `source` (downloading gs://), read its config and detect its format."""
    local = resolve_local(source, cache_dir)
    config = _read_json(local / "config.json")
    gen = _read_json(local / "generation_config.json", required=False)
    try:
        spec = base.spec_from_hf_config(config, gen)
    except base.ModelConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    marker = _read_json(local / ORBAX_MARKER, required=False)
    if marker is not None:
        if marker.get("format") == "orbax" and marker.get("version") == 1:
            raise CheckpointError(f"{source}: this Orbax checkpoint was converted by an older "
                                  f"release (weight layout version 1); convert the Hugging Face "
                                  f"checkpoint again with `python -m model_server.convert`")
        if marker.get("format") != "orbax" or marker.get("version") != ORBAX_FORMAT_VERSION:
            raise CheckpointError(f"{source}: unsupported {ORBAX_MARKER}: {marker}")
        if not (local / ORBAX_PARAMS_DIR).is_dir():
            raise CheckpointError(f"{source}: Orbax checkpoint lacks its {ORBAX_PARAMS_DIR}/ directory")
        return Checkpoint(str(source), local, "orbax", spec, config, marker.get("dtype"))
    return Checkpoint(str(source), local, "hf", spec, config)


def read_spec(source: str | os.PathLike) -> base.ModelSpec:
    """The spec of a checkpoint from its config files only (no weights are fetched)."""
    if gcs.is_gcs(source):
        bucket_name, prefix = split_gcs(str(source))
        bucket = gcs.client().bucket(bucket_name)
        texts: dict[str, Optional[str]] = {}
        for name in ("config.json", "generation_config.json"):
            blob = bucket.blob(gcs.join(prefix, name))
            try:
                texts[name] = blob.download_as_text()
            except Exception as e:
                if name == "config.json":
                    raise CheckpointError(f"cannot read {source}/config.json: {e}") from e
                texts[name] = None
        try:
            config = json.loads(texts["config.json"] or "")
            gen = json.loads(texts["generation_config.json"]) if texts["generation_config.json"] else None
        except ValueError as e:
            raise CheckpointError(f"{source}: bad JSON config: {e}") from e
    else:
        local = resolve_local(source)
        config = _read_json(local / "config.json")
        gen = _read_json(local / "generation_config.json", required=False)
    try:
        return base.spec_from_hf_config(config, gen)
    except base.ModelConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
