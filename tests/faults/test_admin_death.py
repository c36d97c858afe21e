"""The admin leader dies (kill -9) during traffic.

Two admins share one PostgreSQL database; model servers and the frontend reach them
through a Service stand-in. The leader is killed while clients generate through the
frontend and a publisher publishes to it; for a gap nothing can reach any admin (the
Service still points at the dead one), then it points at the survivor. Generation never
fails (the frontend serves from its location cache meanwhile), the survivor takes the lease,
and every publish acknowledged before the kill is there afterwards. A replacement admin is
started at the end, as the Deployment would.
"""
from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.cluster import wait_until
from tests.faults.conftest import HEARTBEAT_TIMEOUT_S, MODEL, FaultCell, leader_pgid
from tests.faults.harness import Load, publish, record

pytestmark = pytest.mark.slow

GAP_S = 1.5          # no admin reachable (kept under the heartbeat timeout, 3 s: servers stay "live")
LEASE_TTL_S = 2.0    # AdminProcess's --lease-ttl


class Publisher(threading.Thread):
    """Publishes metadata-only models (no replicas) to one admin, one after another."""

    def __init__(self, admin_url: str, limit: int = 40) -> None:
        super().__init__(daemon=True, name="publisher")
        self.admin_url, self.limit = admin_url, limit
        self.acked: list[str] = []
        self.attempted: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopped.is_set() and len(self.acked) < self.limit:
            model_id = f"/sax/test/meta-{i}"
            i += 1
            self.attempted.append(model_id)
            try:
                r = publish(self.admin_url, model_id, 0, timeout=10)
            except requests.RequestException:
                continue  # in flight when its admin died: not acknowledged
            if r.status_code == 201:
                self.acked.append(model_id)
            time.sleep(0.02)


def test_admin_leader_killed_during_traffic(fault_cell: FaultCell) -> None:
    c = fault_cell
    c.settled(MODEL, 2)
    admins = c.live_admins()
    assert len(admins) >= 2
    leader = wait_until(lambda: next((a for a in admins if leader_pgid(a.url) == a.pid), None), timeout=30,
                        what="a leader")
    survivors = [a for a in admins if a is not leader]
    epoch = requests.get(f"{survivors[0].url}/leader", timeout=5).json()["epoch"]

    load = Load(c.frontend.url, MODEL, clients=8).start()
    publisher = Publisher(leader.url)
    try:
        publisher.start()
        wait_until(lambda: len(publisher.acked) >= 10 and load.ok_count() >= 20, timeout=60,
                   what="publishes and generations flowing")
        c.service.set_backends([])      # the Service still routes to the dying pod: nothing answers
        leader.kill9()
        killed = time.monotonic()
        publisher.stopped.set()
        publisher.join(15)
        acked = list(publisher.acked)

        time.sleep(GAP_S)
        in_gap = load.ok_count(since=killed)
        assert in_gap >= 5, f"only {in_gap} generations during the admin gap"
        gap_failures = [o for o in load.failures if o.started >= killed]
        assert not gap_failures, [o.error for o in gap_failures[:5]]
        c.service.set_backends([a.url.removeprefix("http://") for a in survivors])

        # A survivor takes the lease once the dead leader's expires.
        def took_over() -> bool:
            lease = requests.get(f"{survivors[0].url}/leader", timeout=5).json()
            return bool(lease.get("valid")) and lease["epoch"] > epoch and leader_pgid(survivors[0].url) in {
                a.pid for a in survivors}
        wait_until(took_over, timeout=LEASE_TTL_S + 20, interval=0.05, what="a survivor taking the lease")
        takeover_s = time.monotonic() - killed
        assert takeover_s < LEASE_TTL_S + 5, f"takeover took {takeover_s:.1f}s"

        # Every acknowledged publish survived the kill.
        listed = set(requests.get(f"{c.admin_url}/models", timeout=10).json()["models"])
        missing = [m for m in acked if m not in listed]
        assert not missing, f"acknowledged publishes lost: {missing}"

        # The new leader runs the cell: servers heartbeat to it, publishes work, the model stays up.
        assert publish(c.admin_url, "/sax/test/after-failover", 0).status_code == 201
        c.settled(MODEL, 2)
        after = time.monotonic()
        wait_until(lambda: load.ok_count(since=after) >= 20, timeout=60, what="generations after the failover")
    finally:
        publisher.stopped.set()
        load.stop()
        c.service.set_backends([a.url.removeprefix("http://") for a in c.live_admins()])
    assert not load.failures, load.summary()
    record("admin death: publishes acknowledged before kill -9 / found after", f"{len(acked)} / {len(acked)}")
    record("admin death: generations during the admin gap (1.5 s, 8 clients)", in_gap)
    record("admin death: generations during the whole test", load.summary())
    record("admin death: kill -9 -> survivor holds the lease (lease TTL 2 s)", takeover_s, "s")
    assert time.monotonic() - killed < HEARTBEAT_TIMEOUT_S + 120

    # Restore the cell: a replacement admin joins (and follows: the lease is held).
    replacement = c.start_admin("admin-c")
    c.service.set_backends([a.url.removeprefix("http://") for a in c.live_admins()])
    assert leader_pgid(replacement.url) != replacement.pid
    for m in publisher.attempted + ["/sax/test/after-failover"]:
        requests.delete(f"{c.admin_url}/models{m}", timeout=10)
