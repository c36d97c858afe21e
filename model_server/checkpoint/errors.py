"""The one error every checkpoint problem surfaces as."""
from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: missing files, bad shapes, unknown architecture."""
