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
    (its file's ctime moves within the timeout) while requests do not each pay an fchmod."""
    port = free_port()
    script = textwrap.dedent(f"""
        from admin_server.serving import run_gunicorn, ThreadWorker
        calls = [0]
        base_notify = ThreadWorker.__mro__[1].notify
        def counting(self):
            calls[0] += 1
            base_notify(self)
        ThreadWorker.__mro__[1].notify = counting
        def app(environ, start_response):
            body = str(calls[0]).encode()
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
            touches = int(s.get(f"http://127.0.0.1:{port}/", timeout=5).text)
        elapsed = time.monotonic() - t0
        # worker timeout = 8 / 2 -> a touch at most every min(1 s, 1 s); never one per request
        assert 1 <= touches <= elapsed / 1.0 + 2, (touches, elapsed)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=20)
