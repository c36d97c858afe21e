"""What this server runs on: chip name, topology, accelerator memory, and the JAX mesh."""
from __future__ import annotations

import os
import re
from typing import Any

_GPU_CHIPS = ("h200", "h100", "a100", "l4", "a10", "v100", "t4")


def chip_name(device: Any) -> str:
    """Saxml-style chip names: cpu, h100, a100, l4, tpuv4, tpuv5e, tpuv5p, tpuv6e."""
    if device.platform == "cpu":
        return "cpu"
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "tpu":
        m = re.search(r"v(\d+)\s*(lite|e|p)?", kind)
        if m:
            suffix = {"lite": "e", "e": "e", "p": "p"}.get(m.group(2) or "", "")
            return f"tpuv{m.group(1)}{suffix}"
        return "tpu"
    for chip in _GPU_CHIPS:
        if chip in kind.replace(" ", ""):
            return chip
    return device.platform


def accelerator_memory_bytes(devices: list[Any]) -> int:
    """Total memory of the devices (host RAM for CPU)."""
    if devices[0].platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    total = 0
    for d in devices:
        stats = d.memory_stats() or {}
        total += int(stats.get("bytes_limit", 0))
    return total


def describe() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {"chip": chip_name(devices[0]), "device_count": len(devices),
            "topology": str(len(devices)), "memory_bytes": accelerator_memory_bytes(devices)}


def make_mesh():  # type: ignore[no-untyped-def]
    """A one-axis tensor-parallel mesh over every device, or None on a single device."""
    import jax
    import numpy as np

    devices = jax.devices()
    if len(devices) == 1:
        return None
    return jax.sharding.Mesh(np.array(devices), ("tp",))
