"""The leader loop: every admin process runs one; the lease holder reconciles and snapshots."""
from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

from admin_server.blobstore import BlobStore, BlobStoreError
from admin_server.lease import LeaderLease, LeaseLost
from admin_server.reconciler import Reconciler
from admin_server.settings import AdminSettings
from admin_server.snapshot import write_snapshot

log = logging.getLogger(__name__)


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
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sax-leader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Asks for a pass now (after a local mutation) instead of at the next tick."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            self.lease.release()
        except Exception:
            log.exception("releasing the lease failed")

    def step(self) -> None:
        """One round: election, then (if leader) a reconcile pass and a snapshot if due."""
        epoch = self.lease.acquire_or_renew()
        if epoch is None or not self.lease.is_leader():
            return
        name, holder = self.lease.name, self.lease.holder
        try:
            self.reconciler.run(name, holder, epoch)
            write_snapshot(self.engine, self.store, self.settings.cell_name, name, holder, epoch)
        except LeaseLost as e:
            log.warning("%s", e)
            self.lease.step_down()
        except BlobStoreError as e:
            log.warning("snapshot not written (will retry): %s", e)

    def _run(self) -> None:
        interval = min(self.settings.reconcile_interval_s, self.settings.lease_ttl_s / 3)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("leader round failed")
            self._wake.wait(interval)
            self._wake.clear()
