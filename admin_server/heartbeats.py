"""Model-server heartbeats: the hot path of a large cell.

A server sends its description, its models' observed states, and the
`desired_version` of the last answer it got. When the description and the
report digest are those last written for it, and its desired set has not
changed since (the leader bumps `servers.assignment_version` whenever it
does), the heartbeat touches no database: each process keeps every server's
(assignment version, digests) in memory, reloaded in one query every
`flush_s`; its liveness is noted in memory, a flusher writes all noted times
in one batched UPDATE every `flush_s`, and the answer says `unchanged`. A
change the leader made reaches the server at most `flush_s` later than it
would otherwise. Otherwise the server's replicas are read, changed statuses
written, and the whole desired set returned.
Everything written here is soft state that the next heartbeat re-reports, so
PostgreSQL commits it without waiting for the WAL flush.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update

from common.naming import InvalidArgument
from admin_server.heartbeat_report import DESC_COLUMNS, Heartbeat, ReportedModel, parse_heartbeat
from admin_server.schema import ModelServer, ModelState, Observed, PublishedModel, Replica, Wanted
from admin_server.settings import AdminSettings

log = logging.getLogger(__name__)


# Built once: constructing expressions per request costs more than executing them.
_TOUCH = (update(ModelServer)
          .where(ModelServer.address == bindparam("addr"), ModelServer.cell == bindparam("hb_cell"))
          .values(last_heartbeat=bindparam("now"), desc_digest=bindparam("desc_digest"),
                  report_digest=bindparam("report_digest"), **{c: bindparam(c) for c in DESC_COLUMNS})
          .returning(ModelServer.assignment_version))
_CURRENT = (select(ModelServer.cell, ModelServer.assignment_version, ModelServer.desc_digest,
                   ModelServer.report_digest)
            .where(ModelServer.address == bindparam("addr")))
_KNOWN = (select(ModelServer.address, ModelServer.assignment_version, ModelServer.desc_digest,
                 ModelServer.report_digest)
          .where(ModelServer.cell == bindparam("cell")))
_LIVENESS = (update(ModelServer).where(ModelServer.address == bindparam("addr"))
             .values(last_heartbeat=bindparam("now")))
_OBSERVED = (update(Replica).where(Replica.id == bindparam("rid"))
             .values(observed=bindparam("observed"), error=bindparam("error"),
                     memory_bytes=bindparam("memory_bytes"), load_time_s=bindparam("load_time_s"),
                     updated_at=bindparam("now")))
_LOAD = (update(Replica)
         .where(Replica.server_address == bindparam("addr"), Replica.model_id == bindparam("mid"),
                Replica.generation == bindparam("gen"))
         .values(running=bindparam("running"), waiting=bindparam("waiting"),
                 last_used_at=bindparam("last_used")))
# The same, also marking the replica changed for the leader's probe (its load class moved).
_LOAD_CHANGED = _LOAD.values(updated_at=bindparam("now"))
_REPLICAS = (select(Replica.id, Replica.model_id, Replica.generation, Replica.checkpoint,
                    Replica.wanted, Replica.observed, Replica.error, Replica.memory_bytes,
                    Replica.load_time_s, PublishedModel.model_path, PublishedModel.overrides,
                    PublishedModel.memory_bytes.label("model_memory"))
             .join(PublishedModel, PublishedModel.model_id == Replica.model_id)
             .where(Replica.server_address == bindparam("addr")))


def _load_class(load: tuple[int, int, float | None]) -> tuple[bool, int]:
    """Busy or not, and the queue's order of magnitude: a change the leader must look at."""
    return load[0] + load[1] > 0, load[1].bit_length()


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
        # Under a heartbeat interval: a report one worker wrote reaches every other worker's
        # memory before that server's next heartbeat, so a stale entry can never match it.
        self.flush_s = min(flush_s, settings.heartbeat_interval_s / 2)
        # Reads need no transaction on PostgreSQL (saves BEGIN/COMMIT round trips).
        self.reader = (engine.execution_options(isolation_level="AUTOCOMMIT")
                       if engine.dialect.name == "postgresql" else engine)
        self._pending: dict[str, float] = {}
        # (address, model id, generation) -> (running, waiting, last used) as last reported, and
        # as last written: the flusher writes the changes in batches.
        self._loads: dict[tuple[str, str, int], tuple[int, int, float | None]] = {}
        self._loads_written: dict[tuple[str, str, int], tuple[int, int, float | None]] = {}
        # address -> (assignment_version, desc_digest, report_digest) as last read or written.
        self._known: dict[str, tuple[int, str | None, str | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sax-liveness", daemon=True)
        self._thread.start()

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        """Handles one heartbeat; returns the server's desired set (or `unchanged`)."""
        beat = self.prepare(body)
        answer = self.from_memory(beat)
        return answer if answer is not None else self.record_changed(beat)

    def prepare(self, body: dict[str, Any]) -> Heartbeat:
        """Validates a heartbeat body (InvalidArgument) and digests what it reports."""
        return parse_heartbeat(body, time.time())

    def from_memory(self, beat: Heartbeat) -> dict[str, Any] | None:
        """The `unchanged` answer when nothing moved for this server (no I/O), else None."""
        address = beat.desc["address"]
        if self._known.get(address) != (beat.known_version, beat.desc_digest, beat.report_digest):
            return None
        with self._lock:
            self._pending[address] = beat.now
            self._note_loads(beat)
        return self._answer(None, beat.known_version)

    def record_changed(self, beat: Heartbeat) -> dict[str, Any]:
        """Reads the server's replicas, writes what changed and answers the whole desired set."""
        desc, reported, now = beat.desc, beat.reported, beat.now
        desc_digest, report_digest = beat.desc_digest, beat.report_digest
        address = desc["address"]
        with self._lock:
            self._note_loads(beat)
        with self.reader.connect() as conn:
            # The version is read before the replicas: a change the leader commits in between
            # is answered under the older version, so the next heartbeat asks again.
            row = conn.execute(_CURRENT, {"addr": address}).first()
            rows = conn.execute(_REPLICAS, {"addr": address}).all()
        by_key = {(m.model_id, m.generation): m for m in reported}
        changes: list[dict[str, Any]] = []
        learned: list[tuple[str, int]] = []
        desired = []
        for r in rows:
            rep = by_key.get((r.model_id, r.generation))
            observed = rep.status if rep else Observed.NONE
            current = {"observed": r.observed, "error": r.error,
                       "memory_bytes": r.memory_bytes, "load_time_s": r.load_time_s}
            new = dict(current, observed=observed)
            if rep is not None:
                for key in ("error", "memory_bytes", "load_time_s"):
                    if getattr(rep, key):
                        new[key] = getattr(rep, key)
                if observed in (Observed.LOADING, Observed.LOADED) and not rep.error:
                    new["error"] = None  # a load's progress note ends with it
                if observed == Observed.LOADED and rep.memory_bytes and r.model_memory is None:
                    learned.append((r.model_id, rep.memory_bytes))
            if new != current:
                changes.append({"rid": r.id, **new})
            if r.wanted == Wanted.LOADED:
                desired.append({"model_id": r.model_id, "generation": r.generation,
                                "model_path": r.model_path,
                                "checkpoint": r.checkpoint if r.checkpoint is not None else "None",
                                "overrides": r.overrides})
        known = {(r.model_id, r.generation) for r in rows}
        orphans = [m for m in reported if (m.model_id, m.generation) not in known
                   and m.status in (Observed.LOADED, Observed.LOADING)]
        written = self._write(desc, desc_digest, report_digest, now, changes, learned)
        version = row.assignment_version if row is not None and row.cell == self.settings.cell_name else written
        if orphans:
            adopted = self._adopt(address, orphans, now)
            if adopted:
                desired.extend(adopted)
                self._bump(address)  # the answer keeps the older version: the next heartbeat re-reads
        self._known[address] = (version, desc_digest, report_digest)
        return self._answer(desired, version)

    def _adopt(self, address: str, orphans: list[ReportedModel], now: float) -> list[dict[str, Any]]:
        """Claims models a server already holds (at the published generation) for replicas the
        model still lacks, instead of telling the server to drop them: after an admin restart,
        a restore from the snapshot or a lost heartbeat, nothing reloads. Surplus is trimmed by
        the leader's next pass, as any surplus is."""
        adopted = []
        with self.engine.begin() as conn:
            for m in orphans:
                model = conn.execute(
                    select(PublishedModel.model_path, PublishedModel.checkpoint, PublishedModel.overrides,
                           PublishedModel.target_replicas)
                    .where(PublishedModel.model_id == m.model_id, PublishedModel.cell == self.settings.cell_name,
                           PublishedModel.state == ModelState.ACTIVE, PublishedModel.generation == m.generation)
                ).first()
                if model is None:
                    continue
                have = conn.execute(select(func.count()).select_from(Replica).where(
                    Replica.model_id == m.model_id, Replica.generation == m.generation,
                    Replica.wanted == Wanted.LOADED)).scalar_one()
                if have >= model.target_replicas:
                    continue
                ins = _dialect_insert(conn)(Replica).values(
                    model_id=m.model_id, server_address=address, generation=m.generation,
                    checkpoint=model.checkpoint, wanted=Wanted.LOADED, observed=m.status,
                    memory_bytes=m.memory_bytes, load_time_s=m.load_time_s, created_at=now, updated_at=now)
                if conn.execute(ins.on_conflict_do_nothing()).rowcount:
                    log.info("adopted %s@%d held by %s", m.model_id, m.generation, address)
                    adopted.append({"model_id": m.model_id, "generation": m.generation,
                                    "model_path": model.model_path,
                                    "checkpoint": model.checkpoint if model.checkpoint is not None else "None",
                                    "overrides": model.overrides})
        return adopted

    def _bump(self, address: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(ModelServer).where(ModelServer.address == address)
                         .values(assignment_version=ModelServer.assignment_version + 1))

    def _answer(self, desired: list[dict[str, Any]] | None, version: int) -> dict[str, Any]:
        answer: dict[str, Any] = {"desired_version": version,
                                  "heartbeat_interval_s": self.settings.heartbeat_interval_s,
                                  "cell": self.settings.cell}
        if desired is None:
            answer["unchanged"] = True
        else:
            answer["desired"] = desired
        return answer

    def _write(self, desc: dict[str, Any], desc_digest: str, report_digest: str, now: float,
               changes: list[dict[str, Any]], learned: list[tuple[str, int]]) -> int:
        """Writes the server row and changed replica statuses; returns its assignment version."""
        cell = self.settings.cell_name
        address = desc["address"]
        with self.engine.begin() as conn:
            _soft_commit(conn)
            params = {**desc, "addr": address, "hb_cell": cell, "now": now,
                      "desc_digest": desc_digest, "report_digest": report_digest}
            version = conn.execute(_TOUCH, params).scalar()
            if version is None:
                # New server, or one of another cell at this address. Two first heartbeats
                # may race: the insert ignores the conflict and the touch follows.
                ins = _dialect_insert(conn)(ModelServer).values(
                    cell=cell, first_seen=now, last_heartbeat=now, **desc)
                conn.execute(ins.on_conflict_do_nothing(index_elements=["address"]))
                other = conn.execute(select(ModelServer.cell).where(ModelServer.address == address)).scalar()
                if other != cell:
                    raise InvalidArgument(f"server {address} belongs to cell /sax/{other}")
                version = conn.execute(_TOUCH, params).scalar()
            if changes:
                conn.execute(_OBSERVED, [{**c, "now": now} for c in changes])
            for model_id, memory in learned:
                conn.execute(update(PublishedModel).where(PublishedModel.model_id == model_id,
                                                          PublishedModel.memory_bytes.is_(None))
                             .values(memory_bytes=memory))
        return int(version or 0)

    def _note_loads(self, beat: Heartbeat) -> None:
        """Keeps the load each replica reports (under the lock)."""
        address = beat.desc["address"]
        for m in beat.reported:
            key = (address, m.model_id, m.generation)
            if m.status == Observed.LOADED:
                used = None if m.idle_s is None else round(beat.now - m.idle_s, 1)
                self._loads[key] = (m.running, m.waiting, used)
            else:  # a replica loaded again later is a new row: written afresh
                self._loads_written.pop(key, None)

    def _load_changes(self, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Replica loads to write: (those whose load class moved, the others)."""
        with self._lock:
            loads, self._loads = self._loads, {}
        moved, quiet = [], []
        for key, (running, waiting, used) in loads.items():
            old = self._loads_written.get(key)
            if old is not None:
                if old[:2] == (running, waiting) and (used is None or (old[2] or 0) >= used - 1.0):
                    continue  # unchanged, or last use moved by under a second
                if used is None:
                    used = old[2]
            self._loads_written[key] = (running, waiting, used)
            row = {"addr": key[0], "mid": key[1], "gen": key[2], "running": running, "waiting": waiting,
                   "last_used": used, "now": now}
            (moved if old is None or _load_class(old) != _load_class((running, waiting, used)) else quiet).append(row)
        return moved, quiet

    def flush(self) -> None:
        now = time.time()
        with self._lock:
            batch, self._pending = self._pending, {}
        moved, quiet = self._load_changes(now)
        if not batch and not moved and not quiet:
            return
        with self.engine.begin() as conn:
            _soft_commit(conn)
            # A row deleted meanwhile (declared dead) matches nothing: that server's next
            # heartbeat misses the fast path and inserts it again.
            if batch:
                conn.execute(_LIVENESS, [{"addr": a, "now": t} for a, t in batch.items()])
            if moved:
                conn.execute(_LOAD_CHANGED, moved)
            if quiet:
                conn.execute(_LOAD, quiet)

    def refresh(self) -> None:
        """Reloads every server's (assignment version, digests) of this cell. (Ten times a
        second per process, over every server.)"""
        with self.reader.connect() as conn:
            # Plain columns: the driver's tuples, without building a Row for each.
            rows = conn.execute(_KNOWN, {"cell": self.settings.cell_name}).cursor.fetchall()
        self._known = {r[0]: (r[1], r[2], r[3]) for r in rows}
        if self._loads_written:
            gone = [k for k in self._loads_written if k[0] not in self._known]
            for k in gone:
                self._loads_written.pop(k, None)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                self.refresh()
            except Exception:
                log.exception("writing heartbeat times failed (will retry)")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.flush()
        except Exception:
            log.exception("final heartbeat flush failed")
