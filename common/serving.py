"""Running an app factory under gunicorn (gthread workers for WSGI apps by default).

Shared by every part's `__main__`.
"""
from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker as _GthreadWorker

from common.gate import REFUSED, TIMED_OUT, ConnectionLimits, Framing, raise_open_files, set_stall_timeouts

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
    * Connections are gated (common.gate): the main thread's event loop reads each request
      until it has all of it (within the header deadline and the minimum body rate) and only
      then hands it to a thread, probes to threads of their own; a worker's connections are
      capped with the idlest closed to make room; writes that stall past the send deadline fail.
    """

    HEARTBEAT_S = 1.0
    KEEP_S = 0.5
    PROBE_THREADS = 2
    SWEEP_S = 0.25
    LIMITS = ConnectionLimits()  # set in the arbiter by run_gunicorn, inherited by the workers
    _last_notify = 0.0

    def init_process(self) -> None:
        self._waiting_lock = threading.Lock()
        self._waiting = 0
        self._gated: dict[Any, tuple[Framing, float]] = {}  # conn -> (its framing, when begun)
        self._next_sweep = 0.0
        self.probe_pool = ThreadPoolExecutor(self.PROBE_THREADS, thread_name_prefix="sax-probe")
        self.cfg = SettledConfig(self.cfg)
        super().init_process()

    # --- the gate (main thread) ---

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK, errno.EMFILE,
                               errno.ENFILE):
                raise
            return
        if self.nr_conns >= self.LIMITS.max_connections and not self._make_room():
            _send_and_close(client_sock, REFUSED)
            return
        self.nr_conns += 1
        set_stall_timeouts(client_sock, self.LIMITS.send_timeout_s)
        self._gate(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def enqueue_req(self, conn: Any) -> None:
        """A connection with a whole request goes to a thread; any other to the gate."""
        framing = getattr(conn, "sax_framing", None)
        if framing is None or not framing.done:
            self._gate(conn)
            return
        conn.sax_probe = framing.is_probe
        fs = (self.probe_pool if conn.sax_probe else self.tpool).submit(self.handle, conn)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _gate(self, conn: Any, framing: Framing | None = None) -> None:
        if framing is None:
            framing = Framing(conn.parser.unreader.take_buffered() if conn.parser else b"")
            framing.feed(b"")
        conn.sax_framing = framing
        if framing.done:
            self.enqueue_req(conn)
            return
        conn.sock.setblocking(False)
        self._gated[conn] = (framing, time.monotonic())
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_gated_readable, conn))

    def _on_gated_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_gated(conn)
        elif conn.sax_framing.feed(data):
            self._ungate(conn)
            self.enqueue_req(conn)

    def _ungate(self, conn: Any) -> None:
        self._gated.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close_gated(self, conn: Any, answer: bytes = b"") -> None:
        self._ungate(conn)
        self.nr_conns -= 1
        _send_and_close(conn.sock, answer)

    def _make_room(self) -> bool:
        """Closes the longest-idle kept-alive connection, else the oldest unfinished request."""
        if self.keepalived_conns:
            self.murder_keepalived(force=False)
        if self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.nr_conns -= 1
            conn.close()
            return True
        if self._gated:
            self._close_gated(next(iter(self._gated)))
            return True
        return False

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_S
        late = [c for c, (f, begun) in self._gated.items() if now > self.LIMITS.deadline(begun, len(f.buf))]
        for conn in late:
            self._close_gated(conn, TIMED_OUT if conn.sax_framing.buf else b"")

    # --- threads ---

    def handle(self, conn: Any) -> Any:
        self._unread(conn)
        keep = super().handle(conn)
        while keep is True and self.alive and not conn.sax_probe and self._next_request(conn):
            keep = super().handle(conn)
        return keep

    @staticmethod
    def _unread(conn: Any) -> None:
        """Gives the bytes the gate read to gunicorn's parser."""
        framing = conn.sax_framing
        conn.sax_framing = None
        conn.data_ready = True
        if framing is not None and framing.buf:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(framing.buf))

    def _next_request(self, conn: Any) -> bool:
        """Whether the connection's whole next request arrived within KEEP_S (waited for only
        while fewer than half of the threads are waiting); a part of one goes back to the gate."""
        if conn.parser.unreader.buf.getvalue():  # already read ahead (pipelined)
            framing = Framing(conn.parser.unreader.take_buffered())
        else:
            with self._waiting_lock:
                if self._waiting >= self.cfg.threads // 2:
                    return False
                self._waiting += 1
            try:
                p = select.poll()
                p.register(conn.sock, select.POLLIN)
                if not p.poll(self.KEEP_S * 1000):
                    return False
                framing = Framing(conn.sock.recv(256 * 1024, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return False
            except (OSError, ValueError):
                framing = Framing()
            finally:
                with self._waiting_lock:
                    self._waiting -= 1
            if not framing.buf:
                return False  # EOF: the next handle() ends it
        if framing.feed(b"") and not framing.is_probe:
            conn.sax_framing = framing
            self._unread(conn)
            return True
        conn.parser.unreader.unread(bytes(framing.buf))
        return False  # finish_request finds the bytes and hands them to the gate

    def notify(self) -> None:
        now = time.monotonic()
        every = min(self.HEARTBEAT_S, self.timeout / 4) if self.timeout else self.HEARTBEAT_S
        if now - self._last_notify >= every:
            self._last_notify = now
            super().notify()


def _send_and_close(sock: socket.socket, answer: bytes) -> None:
    """Best-effort canned answer, never blocking the event loop."""
    try:
        sock.setblocking(False)
        if answer:
            sock.send(answer)
    except OSError:
        pass
    finally:
        sock.close()


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
    # The gate (ThreadWorker) caps connections itself; gthread's own cap would stop accepting.
    ThreadWorker.LIMITS = ConnectionLimits.from_env()
    options["worker_connections"] = max(worker_connections, ThreadWorker.LIMITS.max_connections * 2)
    raise_open_files(ThreadWorker.LIMITS.max_connections * workers + 1024)
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
