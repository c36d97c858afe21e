"""Checkpoints: Hugging Face directories and Orbax conversions, local or on GCS.

One module per job:

* `gcs_mirror`: ``gs://bucket/path`` mirrored into a local cache directory (resumable) and
  directories uploaded; the client comes from `common.gcs`.
* `safetensors_reader`: a zero-copy safetensors reader, single file or sharded.
* `formats`: `open_checkpoint` detects HF or Orbax and reads the spec; `read_spec` reads only
  the config files (for memory estimates).
* `loading`: params through each family's HF name table, or an Orbax restore.
* `sharding`: `param_shardings` over a device mesh.
* `writing`: `save_orbax` (what ``python -m model_server.convert`` writes) and `save_hf`.

Every problem with a checkpoint surfaces as `CheckpointError` with a readable message.
"""
from __future__ import annotations

from common.gcs import is_gcs
from model_server.checkpoint.errors import CheckpointError
from model_server.checkpoint.formats import (ORBAX_FORMAT_VERSION, ORBAX_MARKER, ORBAX_PARAMS_DIR,
                                             Checkpoint, open_checkpoint, read_spec)
from model_server.checkpoint.gcs_mirror import (CACHE_ENV, default_cache_dir, download_gcs_dir,
                                                resolve_local, split_gcs, upload_dir_to_gcs)
from model_server.checkpoint.loading import load_checkpoint, load_params
from model_server.checkpoint.safetensors_reader import SafetensorsDir, SafetensorsFile
from model_server.checkpoint.sharding import param_shardings
from model_server.checkpoint.writing import save_hf, save_orbax, side_files

__all__ = [
    "CACHE_ENV", "ORBAX_FORMAT_VERSION", "ORBAX_MARKER", "ORBAX_PARAMS_DIR", "Checkpoint",
    "CheckpointError", "SafetensorsDir", "SafetensorsFile", "default_cache_dir", "download_gcs_dir",
    "is_gcs", "load_checkpoint", "load_params", "open_checkpoint", "param_shardings", "read_spec",
    "resolve_local", "save_hf", "save_orbax", "side_files", "split_gcs", "upload_dir_to_gcs",
]
