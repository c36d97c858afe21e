"""Native CPU kernels, called from jitted code as XLA FFI custom calls.

* ``decode_attention``: a decode step's attention straight from the paged KV cache, through
  the block tables (decode_attention.cc);
* ``argmax``: the greedy pick over a decode step's logits (argmax.cc);
* ``prefill_attention``: a prefill chunk's attention to its sequence in the paged KV cache,
  float32 (prefill_attention.cc);
* ``matmul``: ``x . w^T`` for the few rows of a decode step, float32, one call for several
  weights of the same x (matmul.cc); larger products stay with XLA's dot, which is as fast or
  faster there; ``matmul_q8``: the same with int8 weights and float32 scales per output row
  (``quantization: int8``), converted in registers; one row on a CPU with AVX512-VNNI rounds
  x to int16 (one scale per call, ~1.5e-5 of max|x|) and takes integer dot products
  (``SAX_Q8_A16=0``: the float form everywhere).

Only for the CPU backend on a single device (a multi-device mesh, GPU and TPU keep the
pure-JAX code). The C++ sources beside this file are compiled at first use with the
machine's C++ compiler (``-march=native``) into one library in a cache directory
(``SAX_KERNEL_CACHE``, default ``~/.cache/saxplane/kernels``), keyed by the sources, jaxlib's
version, the compiler flags and the CPU; a machine without a compiler, or a failed build,
logs why and falls back to the pure-JAX path. ``SAX_CPU_KERNELS=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path


import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

ENV_SWITCH = "SAX_CPU_KERNELS"
ENV_CACHE = "SAX_KERNEL_CACHE"
#: "0" turns off matmul_q8's int16-activation one-row form (AVX512-VNNI; see matmul.cc).
ENV_Q8_A16 = "SAX_Q8_A16"
_HERE = Path(__file__).parent
_SOURCES = sorted(_HERE.glob("*.cc"))
_HEADERS = sorted(_HERE.glob("*.h"))
#: FFI target name -> the handler symbol the library exports
_TARGETS = {"saxplane_decode_attention": "SaxDecodeAttention",
            "saxplane_decode_attention_q8": "SaxDecodeAttentionQ8", "saxplane_matmul": "SaxMatmul",
            "saxplane_matmul_q8": "SaxMatmulQ8",
            "saxplane_prefill_attention": "SaxPrefillAttention", "saxplane_argmax": "SaxArgmax"}
#: Head dims the prefill kernel takes (multiples of the vector width it has tiles for).
PREFILL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
#: Rows `matmul` takes (others: XLA's dot). Measured on AVX-512 CPUs (GPT-2-small shapes):
#: 1.2-3x XLA's speed from 2 to 64 rows, slower from 128 rows; at 1 row (a GEMV, bound by
#: memory) its one-stream form reads the weights 5-20% faster than XLA's dot.
MATMUL_MIN_ROWS, MATMUL_MAX_ROWS = 1, 64
#: Rows `matmul_q8` takes (others: XLA's dot of the converted weights); see bench/RESULTS.md.
MATMUL_Q8_MAX_ROWS = 64
#: Compiled with fast math (vectorised exp from glibc's libmvec, reassociated sums) but linked
#: without it: GCC < 13 would link crtfastmath.o into the library, which switches the whole
#: process to flushing denormals when it is loaded.
_COMPILE_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-ffast-math", "-pthread"]
_LINK_FLAGS = ["-shared", "-pthread"]
#: Tuning per CPU vendor (see matmul.cc's gemv): measured, not assumed.
_VENDOR_DEFINES = {"GenuineIntel": ["-DSAX_GEMV_PREFETCH_ROWS=4"]}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "saxplane", "kernels")
    return Path(root)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags: `-march=native` code must not run on another CPU
    (a cache directory may be shared between machines)."""
    text = _cpuinfo()
    if not text:
        import platform
        return platform.processor().encode()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))).encode()


def _compile_flags() -> list[str]:
    vendor = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                   if line.startswith("vendor_id")), "")
    return _COMPILE_FLAGS + _VENDOR_DEFINES.get(vendor, [])


def _build() -> Path:
    """The compiled library for these sources, jaxlib, flags and CPU (built if missing)."""
    compile_flags = _compile_flags()
    flags = " ".join(compile_flags + _LINK_FLAGS)
    ident = b"\0".join([*(f.name.encode() + f.read_bytes() for f in _SOURCES + _HEADERS),
                         jaxlib.__version__.encode(), flags.encode(), _cpu_identity()])
    key = hashlib.sha256(ident).hexdigest()[:16]
    out = _cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, lib = [os.path.join(tmp, f"{f.stem}.o") for f in _SOURCES], os.path.join(tmp, "kernels.so")
        try:
            for src, obj in zip(_SOURCES, objs):
                subprocess.run([cxx, *compile_flags, "-I", jax.ffi.include_dir(), "-c", str(src), "-o", obj],
                               check=True, capture_output=True, text=True, timeout=300)
            subprocess.run([cxx, *_LINK_FLAGS, *objs, "-o", lib], check=True, capture_output=True, text=True,
                           timeout=300)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{cxx} failed: {e.stderr.strip()[-2000:]}") from None
        os.replace(lib, out)  # atomic: concurrent builders each install a whole library
    return out


def _load() -> bool:
    """Register the custom calls once per process; False (and why, logged) if unavailable."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state["lib"] = lib
            _state["ok"] = True
            log.info("CPU kernels loaded: %s", ", ".join(_TARGETS))
        except Exception as e:  # noqa: BLE001 - any failure means: use the pure-JAX path
            _state["ok"] = False
            log.warning("CPU kernels unavailable, using pure JAX: %s", e)
        return bool(_state["ok"])


def enabled() -> bool:
    """Whether jitted code traced now should call the CPU kernels."""
    if _off(ENV_SWITCH):
        return False
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
        return False
    return _load()


def _off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def q8_a16() -> bool:
    """Whether `matmul_q8` traced now takes the int16-activation one-row form: the library
    was built with AVX512-VNNI and ``SAX_Q8_A16`` does not turn it off."""
    return not _off(ENV_Q8_A16) and _load() and bool(_state["lib"].SaxQ8A16Available())


def _require() -> None:
    if not _load():
        raise RuntimeError("the CPU kernels are unavailable (see the log)")


def _has_avx512() -> bool:
    return " avx512f" in _cpuinfo()


def _tiled_ok(*dtypes) -> bool:
    """The register-tiled kernels (matmul, prefill attention): float32 only, and tiles sized
    for AVX-512's 32 vector registers (other CPUs keep XLA's code)."""
    return (all(jnp.dtype(d) == jnp.float32 for d in dtypes) and enabled()
            and _has_avx512())


def use_matmul(rows: int, *dtypes) -> bool:
    """Whether a product of `rows` rows traced now should call `matmul`."""
    return MATMUL_MIN_ROWS <= rows <= MATMUL_MAX_ROWS and _tiled_ok(*dtypes)


def use_matmul_q8(rows: int, x_dtype) -> bool:
    """Whether a product of `rows` rows of x by int8 weights traced now should call `matmul_q8`."""
    return MATMUL_MIN_ROWS <= rows <= MATMUL_Q8_MAX_ROWS and _tiled_ok(x_dtype)


def use_prefill_attention(head_dim: int, block_size: int, *dtypes) -> bool:
    """Whether a prefill chunk's attention traced now should call `prefill_attention`."""
    return head_dim in PREFILL_HEAD_DIMS and block_size % 16 == 0 and _tiled_ok(*dtypes)


def decode_attention(q: jax.Array, block_tables: jax.Array, positions: jax.Array, k_pool, v_pool,
                     scale: float, window: int = 0, softcap: float = 0.0) -> jax.Array:
    """One query token per row against its sequence's positions [0, positions[b]] in the
    paged pools (with a `window` > 0: only the last `window` of them; with a `softcap` > 0,
    scores become softcap * tanh(scores / softcap) before the softmax, as Gemma 2's).

    q [B, H, D]; block_tables [B, K], positions [B] int32; pools [blocks, KV, block_size, D]
    (float32 or bfloat16, or int8 `models.quant.QTensor`s with a scale per [blocks, KV,
    block_size] row). Returns [B, H, D] float32 (see decode_attention.cc).
    """
    _require()
    args = (q.astype(jnp.float32), block_tables.astype(jnp.int32), positions.astype(jnp.int32))
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    attrs = dict(scale=np.float32(scale), window=np.int32(window), softcap=np.float32(softcap))
    if hasattr(k_pool, "scale"):  # int8 pools (QTensor)
        call = jax.ffi.ffi_call("saxplane_decode_attention_q8", out)
        return call(*args, k_pool.q, k_pool.scale.astype(jnp.float32), v_pool.q, v_pool.scale.astype(jnp.float32),
                    **attrs)
    return jax.ffi.ffi_call("saxplane_decode_attention", out)(*args, k_pool, v_pool, **attrs)


def matmul(x: jax.Array, *ws: jax.Array) -> list[jax.Array]:
    """x [M, K] . w [N, K]^T -> [M, N] for each weight, all float32, in one call (see
    matmul.cc)."""
    _require()
    call = jax.ffi.ffi_call("saxplane_matmul", [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
                                                for w in ws])
    return list(call(x, *ws))


def matmul_q8(x: jax.Array, *ws) -> list[jax.Array]:
    """x [M, K] float32 . w [N, K]^T -> [M, N] float32 for each int8 weight `w` (a
    `models.quant.QTensor`: values q [N, K] int8, scales [N] float32), in one call."""
    _require()
    call = jax.ffi.ffi_call("saxplane_matmul_q8", [jax.ShapeDtypeStruct((x.shape[0], w.q.shape[0]), jnp.float32)
                                                   for w in ws])
    return list(call(x, *(a for w in ws for a in (w.q, w.scale.astype(jnp.float32))), a16=np.int32(q8_a16())))


def prefill_attention(q: jax.Array, q_positions: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                      block_tables: jax.Array, scale: float, window: int = 0, softcap: float = 0.0) -> jax.Array:
    """A prefill chunk's queries q [B, T, H, D] float32 at `q_positions` [B, T] (not
    decreasing along a row) against their sequences in the paged pools [blocks, KV,
    block_size, D] float32 through `block_tables` [B, K]: key j (position j) is visible to
    query i when j <= q_positions[i] (and, with a `window` > 0, j > q_positions[i] - window);
    `softcap` > 0: scores softcap * tanh(scores / softcap) before the softmax (Gemma 2).
    Returns [B, T, H, D] float32 (see prefill_attention.cc)."""
    _require()
    call = jax.ffi.ffi_call("saxplane_prefill_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, q_positions.astype(jnp.int32), k_pool, v_pool, block_tables.astype(jnp.int32),
                scale=np.float32(scale), window=np.int32(window), softcap=np.float32(softcap))


def argmax(x: jax.Array) -> jax.Array:
    """Row-wise argmax of float32 x [B, V] (first index on ties) -> [B] int32 (see argmax.cc)."""
    _require()
    call = jax.ffi.ffi_call("saxplane_argmax", jax.ShapeDtypeStruct(x.shape[:1], jnp.int32))
    return call(x)
