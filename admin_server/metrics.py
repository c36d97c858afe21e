"""The admin's Prometheus metrics at `/metrics`: the cell as the tables hold it, read at scrape
time (so every admin process, leader or not, answers alike): replicas by status per model,
wanted replicas, consecutive load failures, each server's heartbeat age, liveness and memory,
the leader lease's epoch, the cell's version and how far the blob-store snapshot is behind it.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select

from admin_server.leader import lease_name
from admin_server.lease import current_lease
from admin_server.schema import ModelServer, ModelState, PublishedModel, Replica
from admin_server.snapshot import versions
from admin_server.state import replica_status

bp = Blueprint("metrics", __name__)


class CellCollector:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.ctx
        settings, cell = c.settings, c.settings.cell_name
        now = time.time()
        wanted = GaugeMetricFamily("sax_admin_model_wanted_replicas",
                                   "Replicas a model should have now (the autoscaler's target).", labels=["model"])
        bounds = GaugeMetricFamily("sax_admin_model_replica_bounds", "A model's min_replicas and max_replicas.",
                                   labels=["model", "bound"])
        failures = GaugeMetricFamily("sax_admin_model_load_failures",
                                     "Consecutive failed loads of a model (0 once a replica loads).", labels=["model"])
        replicas = GaugeMetricFamily("sax_admin_replicas", "Replicas by model, server and status "
                                     "(LOADING, LOADED, FAILED, UNLOADING, ...).", labels=["model", "server", "status"])
        load_time = GaugeMetricFamily("sax_admin_replica_load_time_seconds", "How long a replica took to load.",
                                      labels=["model", "server"])
        age = GaugeMetricFamily("sax_admin_server_heartbeat_age_seconds", "Seconds since a server's last heartbeat.",
                                labels=["server"])
        alive = GaugeMetricFamily("sax_admin_server_alive", "1 while a server heartbeats within the timeout.",
                                  labels=["server"])
        memory = GaugeMetricFamily("sax_admin_server_memory_bytes", "Accelerator memory a server reports.",
                                   labels=["server"])
        epoch = GaugeMetricFamily("sax_admin_leader_epoch", "Epoch of the cell's leader lease (bumps on takeover).")
        lease_left = GaugeMetricFamily("sax_admin_leader_lease_remaining_seconds",
                                       "Seconds until the leader lease expires (negative: expired).")
        with c.sessions() as s:
            for m in s.execute(select(PublishedModel.model_id, PublishedModel.target_replicas,
                                      PublishedModel.min_replicas, PublishedModel.max_replicas,
                                      PublishedModel.failures)
                               .where(PublishedModel.cell == cell, PublishedModel.state == ModelState.ACTIVE)):
                wanted.add_metric([m.model_id], m.target_replicas)
                bounds.add_metric([m.model_id, "min"], m.min_replicas)
                bounds.add_metric([m.model_id, "max"], m.max_replicas)
                failures.add_metric([m.model_id], m.failures or 0)
            counts: dict[tuple[str, str, str], int] = {}
            rows = s.scalars(select(Replica).join(PublishedModel, PublishedModel.model_id == Replica.model_id)
                             .where(PublishedModel.cell == cell))
            for r in rows:
                key = (r.model_id, r.server_address, replica_status(r, now))
                counts[key] = counts.get(key, 0) + 1
                if r.load_time_s:
                    load_time.add_metric([r.model_id, r.server_address], r.load_time_s)
            for (model, server, status), n in sorted(counts.items()):
                replicas.add_metric([model, server, status], n)
            for srv in s.execute(select(ModelServer.address, ModelServer.last_heartbeat, ModelServer.memory_bytes)
                                 .where(ModelServer.cell == cell)):
                age.add_metric([srv.address], round(now - srv.last_heartbeat, 3))
                alive.add_metric([srv.address], float(now - srv.last_heartbeat <= settings.dead_after_s))
                memory.add_metric([srv.address], srv.memory_bytes)
        lease = current_lease(c.engine, lease_name(settings))
        if lease:
            epoch.add_metric([], float(lease["epoch"]))  # type: ignore[arg-type]
            lease_left.add_metric([], round(float(lease["expires_at"]) - now, 3))  # type: ignore[arg-type]
        version, written = versions(c.engine, cell)
        cell_version = GaugeMetricFamily("sax_admin_cell_version", "Changes to the published set so far.")
        cell_version.add_metric([], version)
        behind = GaugeMetricFamily("sax_admin_snapshot_behind", "Changes the blob-store snapshot does not hold yet.")
        behind.add_metric([], version - written)
        yield from (wanted, bounds, failures, replicas, load_time, age, alive, memory, epoch, lease_left,
                    cell_version, behind)


@bp.get("/metrics")
def metrics():  # type: ignore[no-untyped-def]
    ext = current_app.extensions
    registry = ext.get("sax_admin_metrics")
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CellCollector(ext["sax_admin"]))
        registry = ext.setdefault("sax_admin_metrics", registry)
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4; charset=utf-8")
