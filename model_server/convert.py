"""Convert a Hugging Face checkpoint to an Orbax one (weights in the serving dtype and layout).

    python -m model_server.convert <hf-dir-or-gs://...> <out-dir-or-gs://...> [--dtype D]

The output holds `params/` (Orbax StandardCheckpointer), `saxplane.json` (format marker)
and the HF config / generation config / tokenizer files; it loads with the same model paths.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from model_server import checkpoint as ck

log = logging.getLogger("model_server.convert")


def convert(src: str, dst: str, dtype: str = "keep", *, cache_dir: Optional[str] = None) -> None:
    """Convert `src` (HF, local or gs://) into an Orbax checkpoint at `dst` (local or gs://)."""
    t0 = time.monotonic()
    ckpt = ck.open_checkpoint(src, cache_dir=cache_dir)
    if ckpt.format != "hf":
        raise ck.CheckpointError(f"{src} is already an Orbax checkpoint")
    if dtype == "keep":
        dtype = _stored_dtype(ckpt)
    params = ck.load_params(ckpt, dtype, on_device=False)
    if ck.is_gcs(dst):
        with tempfile.TemporaryDirectory(prefix="saxplane-convert-") as tmp:
            ck.save_orbax(ckpt, params, Path(tmp) / "out", dtype)
            ck.upload_dir_to_gcs(Path(tmp) / "out", dst)
    else:
        ck.save_orbax(ckpt, params, dst, dtype)
    log.info("converted %s -> %s (%s) in %.1fs", src, dst, dtype, time.monotonic() - t0)


def _stored_dtype(ckpt: ck.Checkpoint) -> str:
    """float32 or bfloat16, following the checkpoint's config (dtype / torch_dtype)."""
    declared = ckpt.hf_config.get("dtype") or ckpt.hf_config.get("torch_dtype") or "float32"
    return "bfloat16" if declared in ("bfloat16", "float16") else "float32"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_server.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Hugging Face checkpoint directory or gs:// path")
    parser.add_argument("dst", help="output directory or gs:// path")
    parser.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                        help="dtype to store params in (default: as the checkpoint declares)")
    parser.add_argument("--cache-dir", help="local cache for gs:// downloads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        convert(args.src, args.dst, args.dtype, cache_dir=args.cache_dir)
    except ck.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
