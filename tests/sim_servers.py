"""Simulated model servers: real HTTP heartbeat clients with no JAX behind them.

Each one announces itself, heartbeats, and "loads" what the admin wants
after a short delay (or fails, for checkpoints listed in `fail_checkpoints`).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class SimServer:
    admin_url: str
    address: str
    memory_bytes: int
    servable: list[str] = field(default_factory=lambda: ["test.tiny"])
    chip: str = "cpu"
    tags: list[str] = field(default_factory=list)
    interval_s: float = 0.2
    load_delay_s: float = 0.3
    fail_checkpoints: set[str] = field(default_factory=set)
    token: str | None = None

    def __post_init__(self) -> None:
        self.boot_id = uuid.uuid4().hex
        self.models: dict[tuple[str, int], dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"sim-{self.address}")
        self.session = requests.Session()
        self.errors = 0
        self.desired_version: int | None = None
        self.desired: list[dict[str, Any]] = []
        self.unchanged_answers = 0
        self.unloads: list[tuple[str, int]] = []

    def start(self) -> "SimServer":
        self._thread.start()
        return self

    def kill(self) -> None:
        """Stops heartbeating at once, as a crashed server would."""
        self._stop.set()
        self._thread.join(5)

    def used_memory(self) -> int:
        return sum(m["memory_bytes"] for m in self.models.values())

    def _report(self) -> list[dict[str, Any]]:
        return [{"model_id": k[0], "generation": k[1], "status": m["status"], "error": m.get("error"),
                 "memory_bytes": m["memory_bytes"] if m["status"] == "LOADED" else None,
                 "load_time_s": m.get("load_time_s")} for k, m in self.models.items()]

    def _converge(self, desired: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        wanted = {(d["model_id"], d["generation"]): d for d in desired}
        for key in list(self.models):
            if key not in wanted:
                del self.models[key]  # unload
                self.unloads.append(key)
        for key, d in wanted.items():
            m = self.models.get(key)
            if m is None:
                self.models[key] = {"status": "LOADING", "since": now, "memory_bytes": 0,
                                    "checkpoint": d["checkpoint"],
                                    "ram": int(d["overrides"].get("ram", 0))}
            elif m["status"] == "LOADING" and now - m["since"] >= self.load_delay_s:
                if m["checkpoint"] in self.fail_checkpoints:
                    m.update(status="FAILED", error=f"cannot load checkpoint {m['checkpoint']}")
                else:
                    m.update(status="LOADED", memory_bytes=m["ram"], load_time_s=round(now - m["since"], 3))

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while not self._stop.is_set():
            body = {"server": {"address": self.address, "boot_id": self.boot_id, "chip": self.chip,
                               "topology": "1", "device_count": 1, "memory_bytes": self.memory_bytes,
                               "tags": self.tags, "servable_model_paths": self.servable},
                    "models": self._report(), "desired_version": self.desired_version}
            try:
                r = self.session.post(f"{self.admin_url}/heartbeat", json=body, headers=headers, timeout=5)
                r.raise_for_status()
                answer = r.json()
                if answer.get("unchanged"):
                    self.unchanged_answers += 1
                else:
                    self.desired = answer["desired"]
                self.desired_version = answer["desired_version"]
                self._converge(self.desired)
            except requests.RequestException:
                self.errors += 1  # the admin may be restarting; keep trying
            self._stop.wait(self.interval_s)
