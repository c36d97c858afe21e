"""Heartbeats to the admin: announce this server, report its models, converge to the desired set."""
from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from client.admin import AdminClient
from model_server.manager import ModelManager

log = logging.getLogger(__name__)


class HeartbeatAgent:
    def __init__(self, admin: str, description: dict[str, Any], manager: ModelManager, *,
                 interval_s: float = 2.0, cluster_token: str | None = None) -> None:
        self.client = AdminClient(admin)
        self.description = {**description, "boot_id": uuid.uuid4().hex}
        self.manager = manager
        self.interval_s = interval_s
        self.cluster_token = cluster_token
        self.beats = 0
        self.desired: list[dict[str, Any]] = []
        self.desired_version: int | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sax-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def beat(self) -> None:
        reply = self.client.heartbeat(self.description, self.manager.report(),
                                      desired_version=self.desired_version, cluster_token=self.cluster_token,
                                      timeout_s=max(2.0, self.interval_s * 2))
        if not reply.get("unchanged"):
            self.desired = reply.get("desired", [])
        self.desired_version = reply.get("desired_version")
        self.manager.converge(self.desired)
        self.interval_s = float(reply.get("heartbeat_interval_s") or self.interval_s)
        self.beats += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                if self.failures:
                    log.info("admin reachable again after %d failed heartbeats", self.failures)
                self.failures = 0
            except Exception as e:  # the admin may be down: keep serving, keep trying
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("heartbeat to %s failed (%d in a row): %s", self.client.url, self.failures, e)
            self._stop.wait(self.interval_s)
