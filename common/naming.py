"""Names, paths and publish-time validation shared by every part of the cell.

The admin server, client, model server and frontend all judge a name here, so
a name is judged the same way everywhere.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"^[a-z]+[a-z0-9\-_]*$")
MODEL_PATH_RE = re.compile(r"^[a-zA-Z]+[a-zA-Z0-9_.\-]*$")
# Saxml's checkpoint pattern, plus "gs://" URLs; ".." segments are refused separately.
CHECKPOINT_RE = re.compile(r"^(/|\d|\w|_|\.|-|%|:|=|\||\+)+$")
MAX_NAME_LEN = 128
MAX_CHECKPOINT_LEN = 1024


class InvalidArgument(ValueError):
    """A request argument breaks a naming or validation rule."""


@dataclass(frozen=True)
class ModelId:
    cell: str
    model: str

    @property
    def cell_path(self) -> str:
        return f"/sax/{self.cell}"

    def __str__(self) -> str:
        return f"/sax/{self.cell}/{self.model}"


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LEN:
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: must match {NAME_RE.pattern} "
            f"(at most {MAX_NAME_LEN} characters)")
    return name


def parse_cell(cell: Any) -> str:
    """Parses '/sax/<cell>' (or a bare '<cell>') and returns the cell name."""
    if not isinstance(cell, str) or not cell:
        raise InvalidArgument("cell must be a string like /sax/<cell>")
    parts = cell.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "sax":
        return check_name("cell", parts[1])
    if len(parts) == 1 and not cell.startswith("/"):
        return check_name("cell", parts[0])
    raise InvalidArgument(f"invalid cell {cell!r}: expected /sax/<cell>")


def parse_model_id(model_id: Any) -> ModelId:
    """Parses '/sax/<cell>/<model>'."""
    if not isinstance(model_id, str):
        raise InvalidArgument("model id must be a string like /sax/<cell>/<model>")
    parts = model_id.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "sax":
        raise InvalidArgument(f"invalid model id {model_id!r}: expected /sax/<cell>/<model>")
    return ModelId(check_name("cell", parts[2]), check_name("model", parts[3]))


def check_model_path(model_path: Any) -> str:
    if not isinstance(model_path, str) or not MODEL_PATH_RE.fullmatch(model_path) or len(model_path) > 255:
        raise InvalidArgument(f"invalid model_path {model_path!r}: must match {MODEL_PATH_RE.pattern}")
    return model_path


def check_checkpoint(checkpoint: Any, allowed_roots: tuple[str, ...] = ()) -> str | None:
    """Returns the checkpoint location, or None for the literal 'None' (random weights)."""
    if checkpoint is None or checkpoint == "None":
        return None
    if not isinstance(checkpoint, str) or not checkpoint or len(checkpoint) > MAX_CHECKPOINT_LEN:
        raise InvalidArgument("checkpoint must be a path, a gs:// URL or None")
    if not CHECKPOINT_RE.fullmatch(checkpoint):
        raise InvalidArgument(f"invalid checkpoint {checkpoint!r}: unexpected characters")
    body = checkpoint[5:] if checkpoint.startswith("gs://") else checkpoint
    if ".." in body.split("/"):
        raise InvalidArgument(f"invalid checkpoint {checkpoint!r}: '..' segments are not allowed")
    if allowed_roots:
        norm = checkpoint if checkpoint.startswith("gs://") else posixpath.normpath(checkpoint)
        if not any(norm == r.rstrip("/") or norm.startswith(r.rstrip("/") + "/") for r in allowed_roots):
            raise InvalidArgument(f"checkpoint {checkpoint!r} is outside the allowed roots")
    return checkpoint


def check_replicas(replicas: Any, maximum: int, name: str = "replicas") -> int:
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if isinstance(replicas, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", replicas):
            replicas = int(replicas)
        else:
            raise InvalidArgument(f"{name} must be a non-negative integer, got {replicas!r}")
    if replicas < 0 or replicas > maximum:
        raise InvalidArgument(f"{name} must be between 0 and {maximum}, got {replicas}")
    return replicas


DEFAULT_IDLE_SECONDS = 300.0
MAX_IDLE_SECONDS = 30 * 86400.0


def check_scaling(replicas: int, min_replicas: Any, max_replicas: Any, idle_seconds: Any,
                  maximum: int) -> tuple[int, int, float]:
    """(min_replicas, max_replicas, idle_seconds) with `min <= replicas <= max`; the bounds
    default to `replicas`, `idle_seconds` to DEFAULT_IDLE_SECONDS."""
    lo = replicas if min_replicas is None else check_replicas(min_replicas, maximum, "min_replicas")
    hi = replicas if max_replicas is None else check_replicas(max_replicas, maximum, "max_replicas")
    if not lo <= replicas <= hi:
        raise InvalidArgument(f"need min_replicas <= replicas <= max_replicas, got {lo} <= {replicas} <= {hi}")
    if idle_seconds is None:
        return lo, hi, DEFAULT_IDLE_SECONDS
    if isinstance(idle_seconds, str):
        try:
            idle_seconds = float(idle_seconds)
        except ValueError:
            raise InvalidArgument(f"idle_seconds must be a number, got {idle_seconds!r}") from None
    if (isinstance(idle_seconds, bool) or not isinstance(idle_seconds, (int, float))
            or not 0 < idle_seconds <= MAX_IDLE_SECONDS):
        raise InvalidArgument(f"idle_seconds must be a number in (0, {MAX_IDLE_SECONDS:.0f}], got {idle_seconds!r}")
    return lo, hi, float(idle_seconds)
