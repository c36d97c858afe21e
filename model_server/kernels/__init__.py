"""Native CPU kernels, called from jitted code as XLA FFI custom calls.

Only for the CPU backend on a single device (a multi-device mesh, GPU and TPU keep the
pure-JAX code). The C++ sources beside this file are compiled at first use with the
machine's C++ compiler (``-march=native``) into a cache directory (``SAX_KERNEL_CACHE``,
default ``~/.cache/saxplane/kernels``), keyed by the source, jaxlib's version, the compiler
flags and the CPU; a machine without a compiler, or a failed build, logs why and falls back
to the pure-JAX path. ``SAX_CPU_KERNELS=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

ENV_SWITCH = "SAX_CPU_KERNELS"
ENV_CACHE = "SAX_KERNEL_CACHE"
_SOURCE = Path(__file__).with_name("decode_attention.cc")
_TARGET = "saxplane_decode_attention"
#: Compiled with fast math (vectorised exp from glibc's libmvec, reassociated sums) but linked
#: without it: GCC < 13 would link crtfastmath.o into the library, which switches the whole
#: process to flushing denormals when it is loaded.
_COMPILE_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-ffast-math", "-pthread"]
_LINK_FLAGS = ["-shared", "-pthread"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "saxplane", "kernels")
    return Path(root)


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags: `-march=native` code must not run on another CPU
    (a cache directory may be shared between machines)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor().encode()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))).encode()


def _build() -> Path:
    """The compiled library for this source, jaxlib, flags and CPU (built if missing)."""
    source = _SOURCE.read_bytes()
    flags = " ".join(_COMPILE_FLAGS + _LINK_FLAGS)
    ident = b"\0".join([source, jaxlib.__version__.encode(), flags.encode(), _cpu_identity()])
    key = hashlib.sha256(ident).hexdigest()[:16]
    out = _cache_dir() / f"decode_attention-{key}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = os.path.join(tmp, "kernel.o"), os.path.join(tmp, "kernel.so")
        try:
            subprocess.run([cxx, *_COMPILE_FLAGS, "-I", jax.ffi.include_dir(), "-c", str(_SOURCE), "-o", obj],
                           check=True, capture_output=True, text=True, timeout=300)
            subprocess.run([cxx, *_LINK_FLAGS, obj, "-o", lib], check=True, capture_output=True, text=True,
                           timeout=300)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{cxx} failed: {e.stderr.strip()[-2000:]}") from None
        os.replace(lib, out)  # atomic: concurrent builders each install a whole library
    return out


def _load() -> Optional[str]:
    """Register the custom call once per process; None (and why, logged) if unavailable."""
    with _lock:
        if "ok" in _state:
            return _TARGET if _state["ok"] else None
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.SaxDecodeAttention), platform="cpu")
            _state["lib"] = lib
            _state["ok"] = True
            log.info("CPU decode-attention kernel loaded")
        except Exception as e:  # noqa: BLE001 - any failure means: use the pure-JAX path
            _state["ok"] = False
            log.warning("CPU kernels unavailable, using pure JAX: %s", e)
        return _TARGET if _state["ok"] else None


def enabled() -> bool:
    """Whether jitted code traced now should call the CPU kernels."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
        return False
    return _load() is not None


def decode_attention(q: jax.Array, slot_ids: jax.Array, positions: jax.Array,
                     k_blocks: Sequence[jax.Array], v_blocks: Sequence[jax.Array], scale: float) -> jax.Array:
    """One query token per row against its slot's cache positions [0, positions[b]].

    q [B, H, D]; slot_ids, positions [B] int32; blocks [N, KV, S_j, D] (float32 or bfloat16,
    consecutive positions). Returns [B, H, D] float32 (see decode_attention.cc).
    """
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), slot_ids.astype(jnp.int32), positions.astype(jnp.int32),
                *k_blocks, *v_blocks, scale=np.float32(scale))
