"""Model families (Flax/JAX pure functions over a params pytree); see `base` for the contract."""
