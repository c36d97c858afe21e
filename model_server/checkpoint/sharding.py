"""How params lie on a device mesh (tensor parallelism over the mesh's first axis)."""
from __future__ import annotations

from typing import Any, Optional

import jax

from model_server.models import base


def param_shardings(spec: base.ModelSpec, mesh: Optional[jax.sharding.Mesh]) -> Any:
    """NamedSharding per param for `mesh` (axis 0 is tensor parallel), or None."""
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    specs = base.param_partition_specs(spec, axis, mesh.shape[axis])
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
