"""Checkpoint loading: Hugging Face directories and Orbax checkpoints, local or on GCS.

* HF directory: config.json, model.safetensors or sharded ``*.safetensors`` with
  ``model.safetensors.index.json``, tokenizer files, optional generation_config.json.
* Orbax (written by ``python -m model_server.convert``): the HF json/tokenizer files plus
  ``saxplane.json`` (format marker) and ``params/`` (an Orbax StandardCheckpointer tree).
* ``gs://bucket/path`` is first mirrored into a local cache directory (resumable: files whose
  size already matches are skipped, partial downloads continue), then loaded as above.

Every problem with a checkpoint surfaces as `CheckpointError` with a readable message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from model_server.models import base
from model_server.models.hfmap import empty_like_shapes, set_path

log = logging.getLogger(__name__)

ORBAX_MARKER = "saxplane.json"
ORBAX_PARAMS_DIR = "params"
#: 2: matrices [out, in] (torch Linear's layout); 1 held them [in, out].
ORBAX_FORMAT_VERSION = 2
CACHE_ENV = "SAX_CHECKPOINT_CACHE"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: missing files, bad shapes, unknown architecture."""


# --------------------------------------------------------------------------- GCS

def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise CheckpointError(f"bad GCS path {uri!r}")
    return bucket, prefix.strip("/")


def gcs_client():
    """A storage client; anonymous when STORAGE_EMULATOR_HOST points at an emulator."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "saxplane"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saxplane" / "checkpoints")


_download_locks: dict[Path, threading.Lock] = {}
_download_locks_guard = threading.Lock()


def download_gcs_dir(uri: str, dest: str | os.PathLike | None = None, *, client=None) -> Path:
    """Mirror every object under `uri` into `dest` (default: the cache dir); returns `dest`.

    Files already present with the right size (and CRC32C, when this cache fetched them) are
    skipped; a ``.partial`` file left by an interrupted download is continued from its size;
    each file is fetched in ranged chunks, logging its progress, and checked against the
    object's CRC32C. Concurrent calls for one `dest` in this process are serialised.
    """
    bucket_name, prefix = split_gcs(uri)
    dest = Path(dest) if dest is not None else default_cache_dir() / bucket_name / prefix
    with _download_locks_guard:
        lock = _download_locks.setdefault(dest.absolute(), threading.Lock())
    with lock:
        return _download_gcs_dir(uri, bucket_name, prefix, dest, client)


def _download_gcs_dir(uri: str, bucket_name: str, prefix: str, dest: Path, client) -> Path:
    client = client or gcs_client()
    try:
        blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix + "/" if prefix else None)
                 if not b.name.endswith("/")]
    except Exception as e:  # NotFound, Forbidden, connection errors
        raise CheckpointError(f"cannot list {uri}: {e}") from e
    if not blobs:
        raise CheckpointError(f"no checkpoint at {uri}: no objects under that prefix")
    total = sum(b.size or 0 for b in blobs)
    log.info("checkpoint %s: %d files, %.1f MB -> %s", uri, len(blobs), total / 1e6, dest)
    done_bytes, skipped, t0 = 0, 0, time.monotonic()
    manifest_path = dest / _MANIFEST
    manifest = _read_manifest(manifest_path)
    for i, blob in enumerate(blobs, 1):
        rel = blob.name[len(prefix) + 1:] if prefix else blob.name
        target = dest / rel
        known = manifest.get(rel)
        if target.is_file() and target.stat().st_size == blob.size and (
                known is None or known == blob.crc32c):
            skipped += 1
            done_bytes += blob.size or 0
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_blob(blob, target, _Progress(f"checkpoint {uri}: [{i}/{len(blobs)}] {rel}",
                                               done_bytes, total))
        manifest[rel] = blob.crc32c
        manifest_path.write_text(json.dumps(manifest))
        done_bytes += blob.size or 0
    log.info("checkpoint %s: downloaded in %.1fs (%d files already present)", uri,
             time.monotonic() - t0, skipped)
    return dest


_MANIFEST = ".saxplane-download.json"  # name -> crc32c of what was downloaded
#: Bytes per ranged GET of a checkpoint file: the grain of progress lines and of resumption.
DOWNLOAD_CHUNK = 64 << 20
#: Seconds between a file's progress lines (its last chunk is always reported).
PROGRESS_INTERVAL_S = 5.0


class _Progress:
    """Logs a download's progress: the file's bytes and the whole checkpoint's, throttled."""

    def __init__(self, what: str, before: int, total: int):
        self.what, self.before, self.total = what, before, total
        self.t0 = self.last = time.monotonic()

    def __call__(self, have: int, size: int) -> None:
        now = time.monotonic()
        if have < size and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        log.info("%s: %.1f/%.1f MB (checkpoint %.1f/%.1f MB, %.1f MB/s)", self.what, have / 1e6,
                 size / 1e6, (self.before + have) / 1e6, self.total / 1e6,
                 have / 1e6 / max(now - self.t0, 1e-6))


def _read_manifest(path: Path) -> dict[str, Optional[str]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _crc32c(path: Path) -> str:
    """Base64 of the big-endian CRC32C of a file, as GCS reports an object's."""
    import base64

    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def _download_blob(blob, target: Path, progress: _Progress) -> None:
    """Fetch `blob` into `target` in ranged chunks through ``target.partial``.

    A ``.partial`` left by an interrupted download is continued from its size; the whole file
    is then checked against the object's CRC32C, and fetched once more from the start if it
    does not match (e.g. the object changed while it was half downloaded).
    """
    partial = target.with_name(target.name + ".partial")
    size = blob.size or 0
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        have = 0
    try:
        for attempt in (1, 2):
            if have:
                log.info("gs://%s/%s: continuing from byte %d of %d", blob.bucket.name, blob.name,
                         have, size)
            with open(partial, "ab" if have else "wb") as f:
                while have < size:
                    blob.download_to_file(f, start=have, end=min(have + DOWNLOAD_CHUNK, size) - 1,
                                          raw_download=True)
                    if f.tell() <= have:
                        raise CheckpointError(f"download of gs://{blob.bucket.name}/{blob.name} "
                                              f"stopped at byte {have} of {size}")
                    have = f.tell()
                    progress(have, size)
            if partial.stat().st_size == size and (blob.crc32c is None or _crc32c(partial) == blob.crc32c):
                break
            log.warning("gs://%s/%s: the downloaded file does not match the object's CRC32C%s",
                        blob.bucket.name, blob.name, "; fetching it again" if attempt == 1 else "")
            have = 0
        else:
            raise CheckpointError(f"download of gs://{blob.bucket.name}/{blob.name} does not match "
                                  f"the object's CRC32C twice")
        os.replace(partial, target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot download gs://{blob.bucket.name}/{blob.name}: {e}") from e


def upload_dir_to_gcs(local: str | os.PathLike, uri: str, *, client=None) -> None:
    bucket_name, prefix = split_gcs(uri)
    client = client or gcs_client()
    bucket = client.bucket(bucket_name)
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = "/".join(filter(None, [prefix, path.relative_to(root).as_posix()]))
        bucket.blob(name).upload_from_filename(str(path))
        log.info("uploaded gs://%s/%s", bucket_name, name)


def resolve_local(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory holding the checkpoint (downloading gs:// paths first)."""
    if is_gcs(path):
        dest = None
        if cache_dir is not None:
            bucket, prefix = split_gcs(str(path))
            dest = Path(cache_dir) / bucket / prefix
        return download_gcs_dir(str(path), dest)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    return p


# --------------------------------------------------------------------------- safetensors

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
                others = sorted(p.name for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
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


# --------------------------------------------------------------------------- checkpoints

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
    if is_gcs(source):
        bucket_name, prefix = split_gcs(str(source))
        bucket = gcs_client().bucket(bucket_name)
        texts: dict[str, Optional[str]] = {}
        for name in ("config.json", "generation_config.json"):
            blob = bucket.blob("/".join(filter(None, [prefix, name])))
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


def param_shardings(spec: base.ModelSpec, mesh: Optional[jax.sharding.Mesh]) -> Any:
    """NamedSharding per param for `mesh` (axis 0 is tensor parallel), or None."""
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    specs = base.param_partition_specs(spec, axis, mesh.shape[axis])
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def load_params(ckpt: Checkpoint, dtype: Any = "float32", *,
                mesh: Optional[jax.sharding.Mesh] = None, on_device: bool = True) -> Any:
    """Load the params of `ckpt` in `dtype` (sharded over `mesh` when given).

    With `on_device=False` (HF only) returns host numpy arrays, e.g. for conversion.
    """
    t0 = time.monotonic()
    shardings = param_shardings(ckpt.spec, mesh)
    if ckpt.format == "orbax":
        params = _restore_orbax(ckpt, dtype, shardings)
    else:
        params = _load_hf_params(ckpt, dtype, shardings, on_device)
    log.info("loaded %s params (%s, %.1f MB) in %.2fs", ckpt.source, ckpt.format,
             base.param_bytes(ckpt.spec, dtype) / 1e6, time.monotonic() - t0)
    return params


def _load_hf_params(ckpt: Checkpoint, dtype: Any, shardings: Any, on_device: bool) -> Any:
    spec = ckpt.spec
    family = base.family_module(spec)
    tensors = SafetensorsDir(ckpt.path)
    rules = family.hf_rules(spec)
    shapes = base.param_shapes(spec)
    names = {r.hf_name: tensors.find(r.hf_name, family.HF_PREFIX) for r in rules}
    missing = sorted(n for n, found in names.items() if found is None)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{ckpt.source}: {len(missing)} tensors missing for {spec.architecture}: "
            f"{', '.join(missing[:5])}{more}")
    np_dtype = base.dtype_of(dtype)
    params = empty_like_shapes(shapes)
    stacks: dict[tuple, list] = {}  # path -> [host array, entries filled] (expert-stacked params)
    for rule in rules:
        stored = names[rule.hf_name]
        raw = tensors.where[stored].get(stored)
        if rule.split is not None and raw.shape[rule.split[0]] % rule.split[2]:
            raise CheckpointError(f"{ckpt.source}: tensor {stored} has shape {raw.shape}, "
                                  f"cannot split it in {rule.split[2]}")
        arr = rule.apply(raw)
        want = _get(shapes, rule.path)
        expect = tuple(want) if rule.index is None else tuple(want[1:])
        if tuple(arr.shape) != expect:
            raise CheckpointError(
                f"{ckpt.source}: tensor {stored} has shape {tuple(raw.shape)}, expected one giving "
                f"{expect} for config {spec.architecture} (hidden {spec.hidden_size}, "
                f"vocab {spec.vocab_size})")
        if rule.index is not None:  # one entry of a stacked param: complete it first
            stack = stacks.setdefault(rule.path, [np.empty(want, np_dtype), 0])
            stack[0][rule.index] = arr
            stack[1] += 1
            if stack[1] < want[0]:
                continue
            arr = stacks.pop(rule.path)[0]
        arr = np.asarray(arr, dtype=np_dtype)
        if on_device:
            sharding = _get(shardings, rule.path) if shardings is not None else None
            arr = _place_host(arr, sharding) if sharding is not None else jnp.asarray(arr)
        set_path(params, rule.path, arr)
    return params


def _place_host(arr: np.ndarray, sharding: Any) -> jax.Array:
    """A host tensor onto `sharding`. Over several hosts (a multi-host slice) each host copies
    only its own devices' shards, without `device_put`'s cross-host equality check (an
    allgather of the whole tensor)."""
    if jax.process_count() == 1:
        return jax.device_put(arr, sharding)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: np.array(arr[idx]))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _restore_orbax(ckpt: Checkpoint, dtype: Any, shardings: Any) -> Any:
    import orbax.checkpoint as ocp

    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, base.param_shapes(ckpt.spec),
                                 is_leaf=lambda x: isinstance(x, tuple))
    target = base.abstract_params(ckpt.spec, dtype, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore((ckpt.path / ORBAX_PARAMS_DIR).absolute(), target)
    except Exception as e:
        raise CheckpointError(f"{ckpt.source}: cannot restore Orbax params: {e}") from e


def load_checkpoint(source: str | os.PathLike, dtype: Any = "float32", *,
                    cache_dir: str | os.PathLike | None = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> tuple[Checkpoint, Any]:
    ckpt = open_checkpoint(source, cache_dir=cache_dir)
    return ckpt, load_params(ckpt, dtype, mesh=mesh)


# --------------------------------------------------------------------------- writing

def side_files(src: Path) -> Iterator[Path]:
    """Config, generation config and tokenizer files of an HF directory (not the weights)."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.endswith(".partial") or p.name in (ORBAX_MARKER, _MANIFEST):
            continue
        if p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json"):
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
    save_file(to_hf(base.family_module(spec).hf_rules(spec), host), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out
