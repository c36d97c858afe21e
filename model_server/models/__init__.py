"""Model families (Flax NNX modules over a params pytree); see `base` for the contract.

Each family is a `base.DecoderModel` subclass entered with `@base.register_family(...)`; importing
this package imports every family module below, so the table is complete before any lookup
(`base.family_class`, `base.spec_from_hf_config`). A new family: a module with its class,
decorated, and one line here.
"""
from model_server.models import base
from model_server.models import gemma, gpt2, llama, moe  # noqa: F401  (registers the families)

__all__ = ["base", "gemma", "gpt2", "llama", "moe"]
