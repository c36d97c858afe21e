"""How params lie on a device mesh (tensor parallelism over the mesh's first axis)."""
from __future__ import annotations

from typing import Any, Optional

import jax

import jax.numpy as jnp

from model_server.models import base, quant


def param_shardings(spec: base.ModelSpec, mesh: Optional[jax.sharding.Mesh],
                    quantization: Optional[str] = None) -> Any:
    """NamedSharding per param for `mesh` (axis 0 is tensor parallel), or None; with
    `quantization`, the tree of the quantized params (see models/quant.py)."""
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    specs = base.param_partition_specs(spec, axis, mesh.shape[axis])
    if quantization is not None:
        specs = quant.partition_specs(specs, base.param_shapes(spec))
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def place_params(params: Any, shardings: Any) -> Any:
    """Host params on the device(s): with their shardings, or on the default device."""
    if shardings is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, shardings)
