"""The gthread worker every WSGI part runs under, as a real gunicorn process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import requests

from tests.cluster import free_port, wait_http


def test_gthread_worker_serves_and_throttles_its_heartbeat(tmp_path):
    """Many requests, few heartbeat-file touches: the arbiter still sees the worker alive
    (its file's ctime moves within the timeout) while requests do not each pay an fchmod. The
    worker reads its settings from a SettledConfig."""
    port = free_port()
    script = textwrap.dedent(f"""
        from common.serving import run_gunicorn, ThreadWorker
        calls, cfg_type = [0], [""]
        base_notify = ThreadWorker.__mro__[1].notify
        def counting(self):
            calls[0] += 1
            cfg_type[0] = type(self.cfg).__name__
            base_notify(self)
        ThreadWorker.__mro__[1].notify = counting
        def app(environ, start_response):
            body = f"{{calls[0]}} {{cfg_type[0]}}".encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        run_gunicorn(lambda: app, bind="127.0.0.1:{port}", workers=1, threads=4, timeout=8)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(),
                            stdout=open(tmp_path / "out.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=30, proc=proc)
        with requests.Session() as s:
            t0 = time.monotonic()
            for _ in range(300):
                assert s.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
            time.sleep(1.2)
            touches, cfg_type = s.get(f"http://127.0.0.1:{port}/", timeout=5).text.split()
            touches = int(touches)
        elapsed = time.monotonic() - t0
        # worker timeout = 8 / 2 -> a touch at most every min(1 s, 1 s); never one per request
        assert 1 <= touches <= elapsed / 1.0 + 2, (touches, elapsed)
        assert cfg_type == "SettledConfig"
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _serve_thread_ids(tmp_path, threads: int):
    """A gunicorn process whose app answers "<id of the serving thread> <requests the worker's
    main loop has handed to its pool so far>"."""
    port = free_port()
    script = textwrap.dedent(f"""
        import threading
        from common.serving import run_gunicorn, ThreadWorker
        handed = [0]
        base_enqueue = ThreadWorker.enqueue_req
        def counting(self, conn):
            handed[0] += 1
            base_enqueue(self, conn)
        ThreadWorker.enqueue_req = counting
        def app(environ, start_response):
            body = f"{{threading.get_ident()}} {{handed[0]}}".encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        run_gunicorn(lambda: app, bind="127.0.0.1:{port}", workers=1, threads={threads}, timeout=8)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(),
                            stdout=open(tmp_path / "out.log", "wb"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/", timeout=30, proc=proc)
    return proc, f"http://127.0.0.1:{port}/"


def test_kept_alive_connection_stays_with_its_thread(tmp_path):
    """Back-to-back requests on one connection are served by the thread that served the first,
    without going through the worker's main loop (stock gthread hands every request to its
    pool from there); after KEEP_S idle the connection is handed back and still served."""
    from common.serving import ThreadWorker

    proc, url = _serve_thread_ids(tmp_path, threads=8)
    try:
        with requests.Session() as s:
            answers = [s.get(url, timeout=5).text.split() for _ in range(50)]
            handed = int(answers[-1][1]) - int(answers[0][1])
            assert handed <= 2, handed  # (a stall past KEEP_S would cost one hand-off)
            assert len({thread for thread, _ in answers}) <= 1 + handed
            time.sleep(ThreadWorker.KEEP_S + 0.3)  # back to the poller, then a thread again
            r = s.get(url, timeout=5)
            assert r.status_code == 200 and int(r.text.split()[1]) > int(answers[-1][1])
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_waiting_threads_leave_room_for_other_connections(tmp_path):
    """With 2 threads at most one waits on its connection: three connections taking turns are
    all served without queueing behind waiting threads for up to KEEP_S each (without that
    cap these 30 requests took 7 s)."""
    proc, url = _serve_thread_ids(tmp_path, threads=2)
    sessions = [requests.Session() for _ in range(3)]
    try:
        t0 = time.monotonic()
        for _ in range(10):
            for s in sessions:
                assert s.get(url, timeout=5).status_code == 200
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in sessions:
            s.close()
        proc.terminate()
        proc.wait(timeout=20)


def test_settled_config_reads_as_the_config_without_its_lookups(monkeypatch):
    """Every setting and the properties a request reads give the Config's values, without a
    `Config.__getattr__` call; anything else still comes from the Config."""
    from gunicorn.config import Config

    from common.serving import SettledConfig

    cfg = Config()
    cfg.set("keepalive", 30)
    cfg.set("limit_request_line", 1234)
    settled = SettledConfig(cfg)
    names = [*cfg.settings, *SettledConfig.PROPERTIES]
    assert {name: getattr(settled, name) for name in names} == {name: getattr(cfg, name) for name in names}
    # (a Config property of a setting's name, e.g. worker_class, wins, and is read through)
    resolved = [name for name in names if name in vars(settled)]
    assert len(resolved) > 100 and "is_ssl" in resolved and "worker_class" not in resolved
    lookups = [0]
    base_getattr = Config.__getattr__

    def counting(self, name):
        lookups[0] += 1
        return base_getattr(self, name)
    monkeypatch.setattr(Config, "__getattr__", counting)
    for name in resolved:
        getattr(settled, name)
    assert (settled.keepalive, settled.limit_request_line) == (30, 1234)
    assert lookups[0] == 0
    assert settled.forwarded_allow_networks() == cfg.forwarded_allow_networks()  # a method
    assert settled.env == cfg.env  # another property, read through
