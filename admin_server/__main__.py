"""`python -m admin_server`: the admin server under gunicorn (uvicorn workers, see asgi.py).

Flags override SAX_* environment variables (see admin_server.settings).
"""
from __future__ import annotations

import logging
from typing import Any

import click

from admin_server.settings import AdminSettings


def serve(settings: AdminSettings) -> None:
    from admin_server.app import create_app, prepare_database
    from admin_server.asgi import AdminAsgi
    from common.serving import run_gunicorn

    prepare_database(settings)  # once, in the master, before workers fork
    run_gunicorn(lambda: AdminAsgi(create_app(settings, prepare=False)),
                 bind=f"{settings.host}:{settings.port}", workers=settings.workers, threads=settings.threads,
                 worker_class="admin_server.asgi.AdminWorker")


@click.command()
@click.option("--port", type=int, help="HTTP port (SAX_ADMIN_PORT, default 10000).")
@click.option("--host", help="Bind address (default 0.0.0.0).")
@click.option("--root", help="SAX_ROOT: local directory or gs://bucket/prefix.")
@click.option("--cell", help="SAX_CELL, e.g. /sax/test.")
@click.option("--db-url", help="SAX_DB_URL, e.g. postgresql+psycopg://host/db (default: SQLite under the root).")
@click.option("--workers", type=int, help="gunicorn worker processes.")
@click.option("--threads", type=int, help="threads per worker.")
@click.option("--heartbeat-interval", "heartbeat_interval_s", type=float, help="Seconds between model-server heartbeats.")
@click.option("--heartbeat-timeout", "heartbeat_timeout_s", type=float, help="Seconds without heartbeat before a server is dead.")
@click.option("--lease-ttl", "lease_ttl_s", type=float, help="Leader lease time to live, seconds.")
@click.option("--reconcile-interval", "reconcile_interval_s", type=float, help="Seconds between reconcile passes.")
@click.option("--retry-backoff", "retry_backoff_s", type=float, help="First back-off after a failed load, seconds.")
@click.option("--scale-up-waiting", "scale_up_waiting", type=float,
              help="Queued requests per ready replica above which a model scales up (SAX_SCALE_UP_WAITING, default 1).")
@click.option("--scale-up-window", "scale_up_window_s", type=float,
              help="Seconds the queue must stay above that before a replica is added (SAX_SCALE_UP_WINDOW, default 10).")
@click.option("--scale-down-load", "scale_down_load", type=float,
              help="Running+queued requests per replica the remaining replicas may carry for a "
                   "scale-down (SAX_SCALE_DOWN_LOAD, default 1).")
@click.option("--db-timeout", "db_timeout_s", type=float,
              help="PostgreSQL: longest statement, lock wait or connect, seconds (SAX_DB_TIMEOUT, default 30).")
@click.option("--migrate/--no-migrate", "auto_migrate", default=None, help="Run migrations at start (default: SQLite only).")
@click.option("--log-level", default="INFO", show_default=True)
def main(log_level: str, **flags: Any) -> None:
    """Run the Saxplane admin server.

    Example: python -m admin_server --root ./sax-root --cell /sax/test --port 10000
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    serve(AdminSettings.from_env(**flags))


if __name__ == "__main__":
    main()
