"""Running an app factory under gunicorn (gthread workers for WSGI apps by default).

Shared by every part's `__main__` (the admin server owns it because it
depends on no other part).
"""
from __future__ import annotations

import json
import math
import os
import re
import select
import socket
import threading
import time
from typing import Any, Callable

from gunicorn.workers.gthread import ThreadWorker as _GthreadWorker

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class SettledConfig:
    """A gunicorn Config with its settings, and the properties a request reads, resolved once.

    Config answers every setting through `__getattr__` and a table lookup; its request parser,
    WSGI environ and response read a few dozen per request (14 us of the 45 us gunicorn spends
    on a small request). A worker's settings never change once it runs. Anything else (methods,
    other properties) comes from the Config itself.
    """

    PROPERTIES = ("is_ssl", "sendfile")

    def __init__(self, cfg: Any) -> None:
        self.__dict__["_cfg"] = cfg
        self.__dict__.update({name: setting.get() for name, setting in cfg.settings.items()
                              if not hasattr(type(cfg), name)})  # a property of that name wins
        self.__dict__.update({name: getattr(cfg, name) for name in self.PROPERTIES})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


class ThreadWorker(_GthreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with three changes for many small requests on kept-alive
    connections.

    * Its heartbeat file is touched at most every HEARTBEAT_S. gthread calls `notify()` (an
      fchmod of that file, so that the arbiter can tell a stuck worker) for every request and
      every turn of its event loop; at thousands of requests a second that system call was 6%
      of the frontend's CPU. The arbiter only needs one within its `timeout`.
    * A thread that answered a kept-alive connection waits up to KEEP_S on it for the next
      request and serves that too, while fewer than half of the threads wait so (the others
      stay free for new connections and streams). gthread hands each answered connection back
      to its main thread, which re-registers it with its poller and, when the next request
      comes, submits it to the pool again: two more wake-ups of the main thread, a future and
      five system calls per request, which made up over half of the frontend's CPU time per
      request. Connections left idle past KEEP_S go back to that poller as before.
    * Its settings are read from a SettledConfig.
    """

    HEARTBEAT_S = 1.0
    KEEP_S = 0.5
    _last_notify = 0.0

    def init_process(self) -> None:
        self._waiting_lock = threading.Lock()
        self._waiting = 0
        self.cfg = SettledConfig(self.cfg)
        super().init_process()

    def handle(self, conn: Any) -> Any:
        keep = super().handle(conn)
        while keep is True and self.alive and self._next_request(conn):
            keep = super().handle(conn)
        return keep

    def _next_request(self, conn: Any) -> bool:
        """Whether the connection's next request arrived within KEEP_S (waited for only while
        fewer than half of the threads are waiting)."""
        if conn.parser.unreader.buf.getvalue():  # already read ahead (pipelined)
            return True
        with self._waiting_lock:
            if self._waiting >= self.cfg.threads // 2:
                return False
            self._waiting += 1
        try:
            p = select.poll()
            p.register(conn.sock, select.POLLIN)
            return bool(p.poll(self.KEEP_S * 1000))  # EOF counts: the next handle() ends it
        except (OSError, ValueError):
            return False
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def notify(self) -> None:
        now = time.monotonic()
        every = min(self.HEARTBEAT_S, self.timeout / 4) if self.timeout else self.HEARTBEAT_S
        if now - self._last_notify >= every:
            self._last_notify = now
            super().notify()


GTHREAD = f"{__name__}.ThreadWorker"


def run_gunicorn(factory: Callable[[], Any], *, bind: str, workers: int, threads: int,
               worker_class: str = GTHREAD, timeout: int = 60, graceful_timeout: int = 10,
               worker_connections: int = 1000,
               worker_exit: Callable[[Any, Any], None] | None = None) -> None:
    """Runs `factory()` in each gunicorn worker (no preload: nothing is shared across fork).
    `worker_connections` bounds each worker's open (keep-alive) connections."""
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": bind, "workers": workers, "threads": threads, "worker_class": worker_class,
        "timeout": timeout, "graceful_timeout": graceful_timeout, "keepalive": 30,
        "accesslog": None, "control_socket_disable": True, "worker_connections": worker_connections,
    }
    if os.path.isdir("/dev/shm"):
        # The worker heartbeat file (see ThreadWorker) in memory, as gunicorn's docs recommend.
        options["worker_tmp_dir"] = "/dev/shm"
    if worker_exit is not None:
        options["worker_exit"] = worker_exit

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if key in self.cfg.settings:  # older gunicorn lacks some settings
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return factory()

    _App().run()


def hung_up(sock: socket.socket | None) -> bool:
    """True once the peer of `sock` closed its side (EOF waiting to be read): under gunicorn,
    `request.environ["gunicorn.socket"]` is the caller's connection."""
    if sock is None:
        return False
    try:
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLRDHUP)
        events = p.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """`json.loads` for request bodies, raising ValueError for anything that is not JSON text:
    also NaN and Infinity (Python's extensions), numbers beyond a double, nesting too deep for
    the parser, and lone UTF-16 surrogate escapes ("\\ud800"), which decode to strings no UTF-8
    text can hold (encoding them later would fail)."""
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("the JSON holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                         "which is not Unicode text") from None
    return data


def read_body(request: Any) -> bytes:
    """A Flask request's body, cached; 413 (RequestEntityTooLarge) past MAX_CONTENT_LENGTH also for
    a chunked body, which werkzeug would otherwise cut at the limit without a word."""
    from werkzeug.exceptions import RequestEntityTooLarge

    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw
