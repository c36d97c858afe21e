"""What a model server's heartbeat says: its description and its models' observed states,
validated from the wire and digested for the recorder's in-memory fast path (heartbeats.py)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from admin_server.schema import Observed
from common.naming import InvalidArgument


@dataclass
class ReportedModel:
    model_id: str
    generation: int
    status: Observed
    error: str | None
    memory_bytes: int | None
    load_time_s: float | None
    # Load (not part of the report digest: it is written in batches, see HeartbeatRecorder).
    running: int = 0
    waiting: int = 0
    idle_s: float | None = None


@dataclass
class Heartbeat:
    """A validated heartbeat with the digests the in-memory fast path compares."""
    desc: dict[str, Any]
    reported: list[ReportedModel]
    known_version: Any
    now: float
    desc_digest: str
    report_digest: str


# The description columns a heartbeat writes to `servers` (and digests).
DESC_COLUMNS = ("boot_id", "chip", "topology", "device_count", "memory_bytes", "tags",
                "servable_model_paths")
_SERVER_FIELDS = {"chip": str, "topology": str, "device_count": int, "memory_bytes": int}
_STATUSES = {o.value for o in Observed}  # (the wire form of a status)


def parse_heartbeat(body: dict[str, Any], now: float) -> Heartbeat:
    """Validates a heartbeat body (InvalidArgument) and digests what it reports."""
    server = body.get("server")
    if not isinstance(server, dict):
        raise InvalidArgument("heartbeat needs a 'server' object")
    address = server.get("address")
    if not isinstance(address, str) or not address or len(address) > 255:
        raise InvalidArgument("server.address must be a non-empty host:port string")
    desc: dict[str, Any] = {"address": address, "boot_id": str(server.get("boot_id", ""))[:64]}
    for key, typ in _SERVER_FIELDS.items():
        value = server.get(key, "" if typ is str else 0)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise InvalidArgument(f"server.{key} must be {typ.__name__}")
        desc[key] = value
    for key in ("tags", "servable_model_paths"):
        value = server.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"server.{key} must be a list of strings")
        desc[key] = value
    models = body.get("models", [])
    if not isinstance(models, list):
        raise InvalidArgument("'models' must be a list")
    reported = []
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("model_id"), str):
            raise InvalidArgument("each reported model needs a model_id")
        if m.get("status") not in _STATUSES:
            raise InvalidArgument(f"unknown model status {m.get('status')!r}")
        try:
            generation = int(m.get("generation", 1))
            memory = int(m["memory_bytes"]) if m.get("memory_bytes") else None
            load_time = float(m["load_time_s"]) if m.get("load_time_s") else None
            running, waiting = max(int(m.get("running") or 0), 0), max(int(m.get("waiting") or 0), 0)
            idle_s = float(m["idle_s"]) if m.get("idle_s") is not None else None
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument("generation, memory_bytes, load_time_s, running, waiting and idle_s "
                                  "must be numbers") from None
        if idle_s is not None and not 0 <= idle_s < 1e9:
            raise InvalidArgument("idle_s must be a non-negative number of seconds")
        # A LOADING replica's error text says what the load is doing (compiling 12 of 50 programs,
        # about 30 s left): listcell and `saxutil ls` show it beside the status.
        status = Observed(m["status"])
        note = m.get("error") or (m.get("progress") if status == Observed.LOADING else None)
        reported.append(ReportedModel(m["model_id"], generation, status,
                                      str(note)[:4000] if note else None, memory, load_time,
                                      min(running, 1 << 30), min(waiting, 1 << 30), idle_s))
    return Heartbeat(desc, reported, body.get("desired_version"), now,
                     _digest([desc[c] for c in DESC_COLUMNS]),
                     _digest(sorted([m.model_id, m.generation, m.status, m.error, m.memory_bytes,
                                     m.load_time_s] for m in reported)))


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, separators=(",", ":")).encode(), digest_size=16).hexdigest()
