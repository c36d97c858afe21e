"""The leader lease: one row per cell in SQL, with an epoch that fences writes.

A holder renews well inside the TTL and considers itself leader only while
its last successful renewal is younger than ``ttl - margin`` on its own
monotonic clock, so it stops acting before anyone else may take over.
Every leader write runs :func:`fence` first in the same transaction.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from admin_server.schema import Lease

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """This process no longer holds the lease it acted under."""


def new_holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def fence(conn: Connection, name: str, holder: str, epoch: int) -> None:
    """Locks the lease row and checks we still hold it at `epoch`; raises LeaseLost otherwise."""
    row = conn.execute(
        select(Lease.holder, Lease.epoch, Lease.expires_at)
        .where(Lease.name == name).with_for_update()).first()
    if row is None or row.holder != holder or row.epoch != epoch or row.expires_at <= time.time():
        raise LeaseLost(f"lease {name} is no longer held by {holder} at epoch {epoch}")


class LeaderLease:
    def __init__(self, engine: Engine, name: str, ttl_s: float, holder: str | None = None) -> None:
        self.engine = engine
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or new_holder_id()
        self.epoch: int | None = None
        self._renewed_mono = 0.0

    @property
    def margin_s(self) -> float:
        return self.ttl_s / 4

    def is_leader(self) -> bool:
        return (self.epoch is not None
                and time.monotonic() - self._renewed_mono < self.ttl_s - self.margin_s)

    def leading_until(self) -> float | None:
        """The monotonic time this holder stops acting unless it renews (None: not leader)."""
        if not self.is_leader():
            return None
        return self._renewed_mono + self.ttl_s - self.margin_s

    def step_down(self) -> None:
        if self.epoch is not None:
            log.warning("stepping down as leader of %s (epoch %s)", self.name, self.epoch)
        self.epoch = None

    def release(self) -> None:
        """Gives the lease up at once (clean shutdown), so a peer need not wait for expiry."""
        if self.epoch is None:
            return
        with self.engine.begin() as conn:
            conn.execute(update(Lease).where(
                Lease.name == self.name, Lease.holder == self.holder, Lease.epoch == self.epoch
            ).values(expires_at=0.0))
        self.epoch = None

    def acquire_or_renew(self) -> int | None:
        """One election round: renews a held lease or takes an expired one. Returns the epoch if leader."""
        started = time.monotonic()
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(Lease.holder, Lease.epoch, Lease.expires_at)
                                   .where(Lease.name == self.name).with_for_update()).first()
                expires = now + self.ttl_s
                if row is None:
                    conn.execute(insert(Lease).values(
                        name=self.name, holder=self.holder, epoch=1, expires_at=expires))
                    epoch = 1
                elif row.holder == self.holder and row.epoch == self.epoch and row.expires_at > now:
                    conn.execute(update(Lease).where(Lease.name == self.name)
                                 .values(expires_at=expires))
                    epoch = row.epoch
                elif row.expires_at <= now:
                    epoch = row.epoch + 1
                    conn.execute(update(Lease).where(Lease.name == self.name, Lease.epoch == row.epoch)
                                 .values(holder=self.holder, epoch=epoch, expires_at=expires))
                else:
                    epoch = None
        except IntegrityError:
            epoch = None  # another process inserted the row first
        except Exception:
            log.exception("lease round for %s failed", self.name)
            epoch = None
        if epoch is None:
            self.step_down()
            return None
        if epoch != self.epoch:
            log.info("became leader of %s at epoch %d (holder %s)", self.name, epoch, self.holder)
        self.epoch = epoch
        self._renewed_mono = started
        return epoch


def current_lease(engine: Engine, name: str) -> dict[str, object] | None:
    with engine.connect() as conn:
        row = conn.execute(select(Lease.holder, Lease.epoch, Lease.expires_at)
                           .where(Lease.name == name)).first()
    if row is None:
        return None
    return {"holder": row.holder, "epoch": row.epoch, "expires_at": row.expires_at,
            "valid": row.expires_at > time.time()}
