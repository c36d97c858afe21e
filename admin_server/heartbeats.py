"""Model-server heartbeats: the hot path of a large cell.

A heartbeat reads the server's replicas (one SELECT) and answers its desired
set. When nothing but the time changed (the server is known to this process
with the same description and every replica's status is as recorded), its
liveness is only noted in memory, and a flusher writes all noted times in one
batched UPDATE every `flush_s`. Anything else (a new server, a changed
description, a replica whose status moved) is written at once in its own
transaction. Everything written here is soft state that the next heartbeat
re-reports, so PostgreSQL commits it without waiting for the WAL flush.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update

from admin_server.naming import InvalidArgument
from admin_server.schema import ModelServer, Observed, PublishedModel, Replica, Wanted
from admin_server.settings import AdminSettings

log = logging.getLogger(__name__)


@dataclass
class ReportedModel:
    model_id: str
    generation: int
    status: str
    error: str | None
    memory_bytes: int | None
    load_time_s: float | None


_SERVER_FIELDS = {"chip": str, "topology": str, "device_count": int, "memory_bytes": int}
_STATUSES = {o.value for o in Observed}


def parse_heartbeat(body: dict[str, Any]) -> tuple[dict[str, Any], list[ReportedModel]]:
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
        except (TypeError, ValueError):
            raise InvalidArgument("generation, memory_bytes and load_time_s must be numbers") from None
        reported.append(ReportedModel(m["model_id"], generation, m["status"],
                                      str(m["error"])[:4000] if m.get("error") else None, memory, load_time))
    return desc, reported


# Built once: constructing expressions per request costs more than executing them.
_DESC_COLUMNS = ("boot_id", "chip", "topology", "device_count", "memory_bytes", "tags",
                 "servable_model_paths")
_TOUCH = (update(ModelServer)
          .where(ModelServer.address == bindparam("addr"), ModelServer.cell == bindparam("hb_cell"))
          .values(last_heartbeat=bindparam("now"), **{c: bindparam(c) for c in _DESC_COLUMNS}))
_LIVENESS = (update(ModelServer).where(ModelServer.address == bindparam("addr"))
             .values(last_heartbeat=bindparam("now")))
_OBSERVED = (update(Replica).where(Replica.id == bindparam("rid"))
             .values(observed=bindparam("observed"), error=bindparam("error"),
                     memory_bytes=bindparam("memory_bytes"), load_time_s=bindparam("load_time_s"),
                     updated_at=bindparam("now")))
_REPLICAS = (select(Replica.id, Replica.model_id, Replica.generation, Replica.checkpoint,
                    Replica.wanted, Replica.observed, Replica.error, Replica.memory_bytes,
                    Replica.load_time_s, PublishedModel.model_path, PublishedModel.overrides,
                    PublishedModel.memory_bytes.label("model_memory"))
             .join(PublishedModel, PublishedModel.model_id == Replica.model_id)
             .where(Replica.server_address == bindparam("addr")))


def _dialect_insert(conn: Connection):  # type: ignore[no-untyped-def]
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _soft_commit(conn: Connection) -> None:
    """Soft state is re-sent every interval: no need to wait for the WAL flush."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


class HeartbeatRecorder:
    def __init__(self, engine: Engine, settings: AdminSettings, flush_s: float = 0.1) -> None:
        self.engine = engine
        self.settings = settings
        self.flush_s = flush_s
        # Reads need no transaction on PostgreSQL (saves BEGIN/COMMIT round trips).
        self.reader = (engine.execution_options(isolation_level="AUTOCOMMIT")
                       if engine.dialect.name == "postgresql" else engine)
        self._known: dict[str, tuple[Any, ...]] = {}  # address -> description last written
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sax-liveness", daemon=True)
        self._thread.start()

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        """Handles one heartbeat; returns the server's desired set."""
        desc, reported = parse_heartbeat(body)
        now = time.time()
        address = desc["address"]
        desc_key = tuple(repr(desc[c]) for c in _DESC_COLUMNS)
        with self.reader.connect() as conn:
            rows = conn.execute(_REPLICAS, {"addr": address}).all()
        by_key = {(m.model_id, m.generation): m for m in reported}
        changes: list[dict[str, Any]] = []
        learned: list[tuple[str, int]] = []
        desired = []
        for row in rows:
            rep = by_key.get((row.model_id, row.generation))
            observed = rep.status if rep else Observed.NONE.value
            current = {"observed": row.observed, "error": row.error,
                       "memory_bytes": row.memory_bytes, "load_time_s": row.load_time_s}
            new = dict(current, observed=observed)
            if rep is not None:
                for key in ("error", "memory_bytes", "load_time_s"):
                    if getattr(rep, key):
                        new[key] = getattr(rep, key)
                if observed == Observed.LOADED.value and rep.memory_bytes and row.model_memory is None:
                    learned.append((row.model_id, rep.memory_bytes))
            if new != current:
                changes.append({"rid": row.id, **new})
            if row.wanted == Wanted.LOADED.value:
                desired.append({"model_id": row.model_id, "generation": row.generation,
                                "model_path": row.model_path,
                                "checkpoint": row.checkpoint if row.checkpoint is not None else "None",
                                "overrides": row.overrides})
        if self._known.get(address) == desc_key and not changes and not learned:
            with self._lock:
                self._pending[address] = now
        else:
            self._write(desc, desc_key, now, changes, learned)
        return {"desired": desired, "heartbeat_interval_s": self.settings.heartbeat_interval_s,
                "cell": self.settings.cell}

    def _write(self, desc: dict[str, Any], desc_key: tuple[Any, ...], now: float,
               changes: list[dict[str, Any]], learned: list[tuple[str, int]]) -> None:
        cell = self.settings.cell_name
        address = desc["address"]
        with self.engine.begin() as conn:
            _soft_commit(conn)  # all of it is re-reported by the next heartbeat
            params = {**desc, "addr": address, "hb_cell": cell, "now": now}
            if not conn.execute(_TOUCH, params).rowcount:
                # New server, or one of another cell at this address. Two first heartbeats
                # may race: the insert ignores the conflict and the touch follows.
                ins = _dialect_insert(conn)(ModelServer).values(
                    cell=cell, first_seen=now, last_heartbeat=now, **desc)
                conn.execute(ins.on_conflict_do_nothing(index_elements=["address"]))
                other = conn.execute(select(ModelServer.cell).where(ModelServer.address == address)).scalar()
                if other != cell:
                    raise InvalidArgument(f"server {address} belongs to cell /sax/{other}")
                conn.execute(_TOUCH, params)
            if changes:
                conn.execute(_OBSERVED, [{**c, "now": now} for c in changes])
            for model_id, memory in learned:
                conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id,
                                                          PublishedModel.memory_bytes.is_(None))
                             .values(memory_bytes=memory))
        self._known[address] = desc_key

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        with self.engine.begin() as conn:
            _soft_commit(conn)
            updated = conn.execute(_LIVENESS, [{"addr": a, "now": t} for a, t in batch.items()]).rowcount
            if updated != len(batch):
                # A row went away (declared dead meanwhile): its next heartbeat re-inserts it.
                present = set(conn.scalars(select(ModelServer.address)
                                           .where(ModelServer.address.in_(list(batch)))))
                for address in set(batch) - present:
                    self._known.pop(address, None)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:
                log.exception("writing heartbeat times failed (will retry)")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.flush()
        except Exception:
            log.exception("final heartbeat flush failed")
