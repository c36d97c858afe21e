"""The leader loop: every admin process runs one; the lease holder reconciles and snapshots.

Two threads. `sax-leader` renews the lease (or tries to take it) and runs reconcile passes;
`sax-snapshot` writes the blob-store snapshot when the leader says one may be due. The
blob store is never on the leader thread's path: a slow or unreachable store (GCS calls
retry for seconds) must neither delay lease renewals nor the reconciler, or leadership
would lapse and dead servers go unnoticed for as long as the store is out. A failed
snapshot is retried with an exponential back-off (SNAPSHOT_RETRY_S doubling up to
SNAPSHOT_RETRY_MAX_S) until it is written; SQL stays the authority meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from admin_server.blobstore import BlobStore, BlobStoreError
from admin_server.lease import LeaderLease, LeaseLost
from admin_server.reconciler import Reconciler
from admin_server.settings import AdminSettings
from admin_server.snapshot import write_snapshot

log = logging.getLogger(__name__)

SNAPSHOT_RETRY_S = 1.0
SNAPSHOT_RETRY_MAX_S = 30.0


def lease_name(settings: AdminSettings) -> str:
    return f"leader{settings.cell}"


class LeaderLoop:
    def __init__(self, engine: Engine, store: BlobStore, settings: AdminSettings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.lease = LeaderLease(engine, lease_name(settings), settings.lease_ttl_s)
        self.reconciler = Reconciler(engine, settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._snapshot_due = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot_thread: threading.Thread | None = None
        self.snapshot_failures = 0
        self._snapshot_retry_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sax-leader", daemon=True)
        self._snapshot_thread = threading.Thread(target=self._run_snapshots, name="sax-snapshot", daemon=True)
        self._thread.start()
        self._snapshot_thread.start()

    def wake(self) -> None:
        """Asks for a pass now (after a local mutation) instead of at the next tick."""
        self._wake.set()

    def snapshot_soon(self) -> None:
        """Asks for a snapshot now (a change waits for it), if this process leads."""
        if self.lease.is_leader():
            self._snapshot_due.set()
        self._wake.set()

    def snapshot_failing_past(self, deadline: float) -> bool:
        """Whether this process leads, its last snapshot failed and the next try comes after
        `deadline` (monotonic): no use waiting for it."""
        return self.lease.is_leader() and self.snapshot_failures > 0 and self._snapshot_retry_at > deadline

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._snapshot_due.set()
        for t in (self._thread, self._snapshot_thread):
            if t:
                t.join(timeout=10)
        try:
            self.lease.release()
        except Exception:
            log.exception("releasing the lease failed")

    def step(self) -> None:
        """One round: election, then (if leader) a reconcile pass; a snapshot may then be due."""
        epoch = self.lease.acquire_or_renew()
        if epoch is None or not self.lease.is_leader():
            return
        try:
            self.reconciler.run(self.lease.name, self.lease.holder, epoch)
        except LeaseLost as e:
            log.warning("%s", e)
            self.lease.step_down()
            return
        self._snapshot_due.set()

    def snapshot(self) -> bool | None:
        """Writes the snapshot if one is due and this process leads: True if written, False
        if none was due, None if this process does not lead."""
        epoch, until = self.lease.epoch, self.lease.leading_until()
        if epoch is None or until is None:
            return None
        return write_snapshot(self.engine, self.store, self.settings.cell_name, self.lease.name,
                              self.lease.holder, epoch, deadline=until)

    def _run(self) -> None:
        interval = min(self.settings.reconcile_interval_s, self.settings.lease_ttl_s / 3)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("leader round failed")
            self._wake.wait(interval)
            self._wake.clear()

    def _run_snapshots(self) -> None:
        while not self._stop.is_set():
            self._snapshot_due.wait()
            self._snapshot_due.clear()
            wait = self._snapshot_retry_at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            try:
                written = self.snapshot()
            except LeaseLost as e:
                log.warning("snapshot not written: %s", e)
            except Exception as e:  # the blob store (or the database) is out: retry later
                self.snapshot_failures += 1
                backoff = min(SNAPSHOT_RETRY_S * 2 ** (self.snapshot_failures - 1), SNAPSHOT_RETRY_MAX_S)
                self._snapshot_retry_at = time.monotonic() + backoff
                if isinstance(e, BlobStoreError):
                    log.warning("snapshot not written (%d failures in a row; next try in %.0fs): %s",
                                self.snapshot_failures, backoff, e)
                else:
                    log.exception("snapshot not written (%d failures in a row; next try in %.0fs)",
                                  self.snapshot_failures, backoff)
                self._snapshot_due.set()  # still due: the next try needs no new trigger
            else:
                if written is None:
                    continue  # not leading: whoever leads writes it
                if written and self.snapshot_failures:
                    log.info("snapshot written again after %d failed tries", self.snapshot_failures)
                self.snapshot_failures = 0
                self._snapshot_retry_at = 0.0
