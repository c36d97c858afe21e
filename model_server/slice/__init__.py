"""Multi-host slices: one model server over several hosts through jax.distributed.

Rank 0 is the slice's face (`leader.SliceLeader`): it heartbeats as one server with the whole
slice's devices and serves the data API; its engines run as on one host, and every device
program they call is first sent as a step record to the other ranks (`lockstep`), which run it
too (`follower`). Loads and unloads go to every rank together. If any rank dies or hangs, rank 0
fails every model (FAILED with the reason, in-flight calls get an error), reports that, and
exits; followers exit as soon as rank 0 is gone. A supervisor restarts the group.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

#: set by `python -m model_server` for its gunicorn worker: the master a failed slice stops too
MASTER_PID_ENV = "_SAXPLANE_GUNICORN_MASTER"


@dataclass(frozen=True)
class SliceConfig:
    """`--slice-hosts N|auto --slice-rank R --coordinator HOST:PORT` (SAX_SLICE_HOSTS, ...)."""

    hosts: Optional[int]            # None: auto (jax.distributed.initialize() finds everything)
    rank: Optional[int] = None
    coordinator: Optional[str] = None
    channel_port: Optional[int] = None  # rank 0's side channel; default: coordinator port + 1
    timeout_s: float = 5.0          # a rank silent this long is lost
    jax_heartbeat_timeout_s: int = 30  # JAX's own (aborts the survivors; keep it above timeout_s + reporting)

    @classmethod
    def parse(cls, hosts: Any, rank: Any = None, coordinator: Optional[str] = None,
              channel_port: Any = None) -> Optional["SliceConfig"]:
        """None for a single-host server (no --slice-hosts, or 1)."""
        if hosts in (None, "", "1", 1):
            return None
        if str(hosts).lower() == "auto":
            return cls(None, None if rank in (None, "") else int(rank), coordinator or None,
                       int(channel_port) if channel_port else None)
        n = int(hosts)
        if n < 1:
            raise ValueError(f"--slice-hosts must be at least 1 or 'auto', got {hosts}")
        if rank in (None, "") or not coordinator:
            raise ValueError("--slice-hosts N needs --slice-rank and --coordinator HOST:PORT")
        r = int(rank)
        if not 0 <= r < n:
            raise ValueError(f"--slice-rank must be in [0, {n}), got {r}")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        return cls(n, r, coordinator, int(channel_port) if channel_port else None)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **flags: Any) -> Optional["SliceConfig"]:
        env = os.environ if env is None else env
        pick = lambda flag, var: flags.get(flag) if flags.get(flag) not in (None, "") else env.get(var)  # noqa: E731
        # under LeaderWorkerSet the rank is the pod's worker index; on TPU VMs, the worker id
        rank = pick("rank", "SAX_SLICE_RANK") or env.get("LWS_WORKER_INDEX") or env.get("TPU_WORKER_ID")
        cfg = cls.parse(pick("hosts", "SAX_SLICE_HOSTS"), rank, pick("coordinator", "SAX_COORDINATOR"),
                        pick("channel_port", "SAX_SLICE_CHANNEL_PORT"))
        if cfg is not None and env.get("SAX_SLICE_TIMEOUT"):
            t = float(env["SAX_SLICE_TIMEOUT"])
            cfg = replace(cfg, timeout_s=t, jax_heartbeat_timeout_s=max(cfg.jax_heartbeat_timeout_s, int(6 * t)))
        return cfg


@dataclass(frozen=True)
class SliceInfo:
    rank: int
    hosts: int
    leader_host: str
    channel_port: int
    local_devices: int
    devices: int

    @property
    def topology(self) -> str:
        return f"{self.hosts} hosts x {self.local_devices} devices"


def initialize(cfg: SliceConfig) -> SliceInfo:
    """jax.distributed.initialize (gloo collectives on CPU); call before anything touches JAX's
    backends."""
    import jax
    from jax._src import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.hosts is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=cfg.jax_heartbeat_timeout_s)
    else:
        jax.distributed.initialize(cfg.coordinator, cfg.hosts, cfg.rank,
                                   heartbeat_timeout_seconds=cfg.jax_heartbeat_timeout_s)
    if cfg.rank is not None and cfg.rank != jax.process_index():
        raise RuntimeError(f"slice rank {cfg.rank} was given, but jax.distributed made this process "
                           f"{jax.process_index()}")
    address = distributed.global_state.coordinator_address or cfg.coordinator or ""
    host, _, port = address.rpartition(":")
    info = SliceInfo(rank=jax.process_index(), hosts=jax.process_count(), leader_host=host.strip("[]"),
                     channel_port=cfg.channel_port or int(port) + 1, local_devices=jax.local_device_count(),
                     devices=jax.device_count())
    if info.rank != 0:  # JAX writes compilation cache entries from process 0 only
        from model_server.slice.xla_cache import write_on_this_rank

        write_on_this_rank()
    log.info("slice rank %d of %d: %d of %d devices, coordinator %s", info.rank, info.hosts,
             info.local_devices, info.devices, address)
    return info
