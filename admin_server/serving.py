"""Running a Flask app factory under gunicorn with gthread workers.

Shared by every part's `__main__` (the admin server owns it because it
depends on no other part).
"""
from __future__ import annotations

import select
import socket
from typing import Any, Callable


def serve_wsgi(factory: Callable[[], Any], *, bind: str, workers: int, threads: int,
               timeout: int = 60, graceful_timeout: int = 10,
               worker_exit: Callable[[Any, Any], None] | None = None,
               post_worker_init: Callable[[Any], None] | None = None) -> None:
    """Runs `factory()` in each gunicorn worker (no preload: nothing is shared across fork)."""
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": bind, "workers": workers, "threads": threads, "worker_class": "gthread",
        "timeout": timeout, "graceful_timeout": graceful_timeout, "keepalive": 30,
        "accesslog": None, "control_socket_disable": True,
    }
    if worker_exit is not None:
        options["worker_exit"] = worker_exit
    if post_worker_init is not None:
        options["post_worker_init"] = post_worker_init

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
