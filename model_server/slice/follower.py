"""A follower rank: builds the same engines as rank 0 and runs the step records it sends.

It serves nothing and holds no request state; it exits when rank 0 is gone (EOF on the side
channel; JAX's coordination service would abort it soon after anyway) or a record fails.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from model_server.slice import SliceInfo
from model_server.slice.channel import FollowerChannel
from model_server.slice.lockstep import Replayer, local_puts

log = logging.getLogger(__name__)


def serve(info: SliceInfo, *, connect_timeout_s: float = 300.0) -> int:
    """Runs until rank 0 goes away or says stop; returns the exit code."""
    from model_server.manager import build_engine

    ch = FollowerChannel(info.leader_host, info.channel_port, info.rank, timeout_s=connect_timeout_s)
    log.info("slice rank %d following %s:%d", info.rank, info.leader_host, info.channel_port)
    replayer = Replayer()
    engines: dict[int, tuple[Any, Any]] = {}
    while True:
        try:
            msg = ch.recv()
        except (OSError, ConnectionError, EOFError) as e:
            log.error("slice rank 0 is gone (%s): exiting", e)
            return 2
        kind = msg[0]
        if kind == "ops":
            try:
                replayer.apply(msg[1])
            except Exception:
                log.exception("a step record failed on rank %d: exiting", info.rank)
                return 4
        elif kind == "load":
            eid, (model_path, checkpoint, overrides, cache_dir) = msg[1], msg[2]
            t0 = time.monotonic()
            try:
                engines[eid] = build_engine(model_path, checkpoint, overrides, cache_dir)
                err = None
            except Exception as e:  # rank 0 fails the load with this
                log.exception("loading %s failed", model_path)
                err = f"{type(e).__name__}: {e}"
            ch.send(("built", eid, err))
            log.info("built %s (engine %d) in %.1fs", model_path, eid, time.monotonic() - t0)
        elif kind == "start":
            eid = msg[1]
            compiled: list[bool] = []

            def progress(done: int, total: int, _name: str, eid: int = eid) -> None:
                if done == total:  # rank 0 waits for this before the warm-up's collectives
                    compiled.append(True)
                    ch.send(("compiled", eid, None))

            try:
                runner = engines[eid][1].runner
                local_puts(runner)
                runner.start(progress)
                err = None
            except Exception as e:
                log.exception("starting engine %d failed", eid)
                err = f"{type(e).__name__}: {e}"
                if not compiled:
                    ch.send(("compiled", eid, err))
            ch.send(("started", eid, err))
        elif kind == "attach":
            replayer.attach(msg[1], engines[msg[1]][1].runner, msg[2])
        elif kind == "unload":
            replayer.detach(msg[1])
            loaded, _ = engines.pop(msg[1], (None, None))
            if loaded is not None and hasattr(loaded, "unload"):
                loaded.unload()
            log.info("unloaded engine %d", msg[1])
        elif kind == "stop":
            return 0
        else:
            log.error("unknown message %r from rank 0", kind)
            return 4


def main(info: SliceInfo) -> None:
    code = serve(info)
    os._exit(code)  # JAX's distributed client would wait for a shutdown barrier rank 0 never reaches
