"""`python -m model_server`: a model server under gunicorn (one worker holding the models).

Flags override SAX_* variables (see model_server.settings).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import click

from model_server.settings import ModelServerSettings, StaticModel, parse_tags


def enable_compilation_cache(path: str) -> None:
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_app(settings: ModelServerSettings):  # type: ignore[no-untyped-def]
    """Creates the manager, static models, heartbeat agent and Flask app (in the worker)."""
    import atexit

    from model_server.app import create_app
    from model_server.devices import describe
    from model_server.manager import ModelManager
    from model_server.registry import list_model_paths

    if settings.compilation_cache:
        enable_compilation_cache(settings.compilation_cache)
    leader = None
    if settings.slice is not None:  # rank 0 of a multi-host slice: the others follow it
        from model_server.slice import initialize
        from model_server.slice.leader import SliceLeader

        leader = SliceLeader(initialize(settings.slice), timeout_s=settings.slice.timeout_s)
        manager = ModelManager(cache_dir=settings.cache_dir, loader=leader.load)
    else:
        manager = ModelManager(cache_dir=settings.cache_dir)
    for m in settings.static_models:
        manager.ensure(m.model_id, 1, m.model_path, m.checkpoint, m.overrides, static=True)
    app = create_app(manager, settings.limits)
    if settings.admin:
        from model_server.agent import HeartbeatAgent

        hw = leader.describe() if leader is not None else describe()
        description = {"address": settings.address, "chip": settings.chip or hw["chip"],
                       "topology": settings.topology or hw["topology"], "device_count": hw["device_count"],
                       "memory_bytes": settings.memory_bytes or hw["memory_bytes"],
                       "tags": list(settings.tags), "servable_model_paths": list_model_paths()}
        agent = HeartbeatAgent(settings.admin, description, manager,
                               interval_s=settings.heartbeat_interval_s, cluster_token=settings.cluster_token)
        agent.start()
        app.extensions["sax_agent"] = agent
        if leader is not None:  # on a lost rank: report FAILED twice, then exit
            seen: dict[str, int] = {}
            leader.beats_needed = lambda: agent.beats < seen.setdefault("beats", agent.beats) + 2
        atexit.register(agent.stop)
    atexit.register(manager.shutdown)
    return app


@click.command()
@click.option("--port", type=int, help="HTTP port (SAX_MODEL_SERVER_PORT, default 10001).")
@click.option("--host", help="Bind address (default 0.0.0.0).")
@click.option("--advertise", help="host:port the admin and clients reach this server at (SAX_ADVERTISE).")
@click.option("--admin", help="Admin server host:port (SAX_ADMIN); without it, only --model entries load.")
@click.option("--cell", help="SAX_CELL, e.g. /sax/test.")
@click.option("--chip", help="Chip name (SAX_CHIP); detected from JAX by default.")
@click.option("--topology", help="Topology (SAX_TOPOLOGY); the device count by default.")
@click.option("--tags", help="Comma-separated server tags (SAX_TAGS).")
@click.option("--memory-bytes", type=int,
              help="Accelerator memory to offer (SAX_MEMORY_BYTES); detected by default.")
@click.option("--heartbeat-interval", "heartbeat_interval_s", type=float, help="Seconds between heartbeats.")
@click.option("--model", "models", multiple=True, metavar="ID=MODEL_PATH:CHECKPOINT",
              help="Load a model at start without an admin, e.g. /sax/test/lm=test.tiny:None.")
@click.option("--override", "overrides", multiple=True, metavar="KEY=JSON",
              help="Override for the --model entries, e.g. num_slots=4 (repeatable).")
@click.option("--threads", type=int, help="Request threads (streams hold one each).")
@click.option("--compilation-cache", help="XLA compilation cache directory (SAX_COMPILATION_CACHE; '' = off).")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1),
              help="Longest prompt in tokens (SAX_MAX_PROMPT_TOKENS; default: the model's context window).")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Most tokens generated per request (SAX_MAX_TOKENS; default: up to the context window).")
@click.option("--max-n", type=click.IntRange(min=1),
              help="Most samples per request: n, num_samples (SAX_MAX_N, default 128).")
@click.option("--slice-hosts", help="Hosts of a multi-host slice (SAX_SLICE_HOSTS), or 'auto' on TPU VMs / GKE.")
@click.option("--slice-rank", help="This host's rank in the slice (SAX_SLICE_RANK; 0 serves, the others follow).")
@click.option("--coordinator", help="HOST:PORT of rank 0's jax.distributed coordinator (SAX_COORDINATOR).")
@click.option("--log-level", default="INFO", show_default=True)
def main(log_level: str, models: tuple[str, ...], overrides: tuple[str, ...], tags: str | None,
         slice_hosts: str | None, slice_rank: str | None, coordinator: str | None, **flags: Any) -> None:
    """Run a Saxplane model server.

    Example: python -m model_server --port 10001 --admin localhost:10000
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    extra = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=JSON, got {item!r}", param_hint="--override")
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    from model_server.slice import SliceConfig

    try:
        slice_cfg = SliceConfig.from_env(hosts=slice_hosts, rank=slice_rank, coordinator=coordinator)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if slice_cfg is not None and slice_cfg.rank is None:
        raise click.UsageError("--slice-hosts auto needs the rank: --slice-rank, SAX_SLICE_RANK, LWS_WORKER_INDEX or TPU_WORKER_ID")
    settings = ModelServerSettings.from_env(
        **flags, tags=parse_tags(tags) if tags else None, slice=slice_cfg,
        static_models=tuple(dataclasses.replace(StaticModel.parse(m), overrides=extra) for m in models) or None)
    if slice_cfg is not None and slice_cfg.rank != 0:  # a follower: no HTTP, no admin
        from model_server.slice import follower, initialize

        if settings.compilation_cache:
            enable_compilation_cache(settings.compilation_cache)
        follower.main(initialize(slice_cfg))
    from common.serving import run_gunicorn

    if slice_cfg is not None:  # a lost rank stops the whole server (model_server.slice.leader)
        from model_server.slice import MASTER_PID_ENV

        os.environ[MASTER_PID_ENV] = str(os.getpid())

    # One worker: the models live in its memory. Streams are long: no worker timeout.
    run_gunicorn(lambda: build_app(settings), bind=f"{settings.host}:{settings.port}", workers=1,
                 threads=settings.threads, timeout=0, graceful_timeout=30)


if __name__ == "__main__":
    main()
