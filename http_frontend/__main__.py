"""`python -m http_frontend`: the HTTP frontend under gunicorn (gthread workers).

Flags override SAX_* variables (see http_frontend.settings).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import click

from http_frontend.settings import FrontendSettings, parse_aliases


def serve(settings: FrontendSettings) -> None:
    from common.serving import run_gunicorn
    from http_frontend.admission import Admission

    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Every worker writes its metrics to files here; /metrics sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sax-frontend-metrics-")
    # Shared memory, made before the fork: counts across every worker.
    admission = Admission(settings.max_outstanding_per_model)
    streams = Admission(settings.max_streams_per_key)

    def factory():  # type: ignore[no-untyped-def]
        from http_frontend.app import create_app
        return create_app(settings, admission, streams)

    try:
        # Streams are long: no worker timeout; on SIGTERM in-flight streams drain for graceful_timeout.
        run_gunicorn(factory, bind=f"{settings.host}:{settings.port}", workers=settings.workers,
                     threads=settings.threads, timeout=0, graceful_timeout=settings.graceful_timeout_s,
                     worker_exit=_worker_exit)
    finally:
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        if metrics_dir.startswith(os.path.join(tempfile.gettempdir(), "sax-frontend-metrics-")):
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
    fe = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("sax_frontend")
    if fe is not None:
        fe.close()


@click.command()
@click.option("--port", type=int, help="HTTP port (SAX_FRONTEND_PORT, default 8888).")
@click.option("--host", help="Bind address (SAX_FRONTEND_HOST, default 0.0.0.0).")
@click.option("--admin", help="Admin server host:port (SAX_ADMIN).")
@click.option("--api-keys", help="Comma-separated API keys for data calls (SAX_API_KEYS); none: open.")
@click.option("--admin-token", help="Token needed to publish/unpublish/update, sent on to the admin "
                                    "(SAX_ADMIN_TOKEN).")
@click.option("--allowed-origins", help="Comma-separated CORS origins, '*' for any (SAX_ALLOWED_ORIGINS); "
                                        "none: CORS off.")
@click.option("--max-body-bytes", type=int, help="Largest request body (SAX_MAX_BODY_BYTES, default 16 MiB).")
@click.option("--max-outstanding-per-model", type=int,
              help="Requests in flight per model before 429s (SAX_MAX_OUTSTANDING_PER_MODEL; 0: no limit).")
@click.option("--max-n", type=click.IntRange(min=1),
              help="Largest n (num_samples on /generate) passed on to a replica "
                   "(SAX_FRONTEND_MAX_N, default 128).")
@click.option("--max-streams-per-key", type=click.IntRange(min=0),
              help="Streams open at once per API key, 429 beyond (SAX_MAX_STREAMS_PER_KEY; 0: no limit). "
                   "Without --api-keys, all callers share one count.")
@click.option("--alias", "aliases", multiple=True, metavar="NAME=MODEL_ID",
              help="An OpenAI model name for a Sax model id (repeatable; SAX_ALIASES, comma-separated).")
@click.option("--default-model", help="Model for tokenizer calls that name none (SAX_DEFAULT_MODEL).")
@click.option("--workers", type=int, help="gunicorn worker processes (SAX_FRONTEND_WORKERS, default 2).")
@click.option("--threads", type=int, help="Threads per worker; a stream holds one (SAX_FRONTEND_THREADS).")
@click.option("--upstream-timeout", "upstream_timeout_s", type=float,
              help="Most seconds between two bytes of a replica's answer (SAX_UPSTREAM_TIMEOUT).")
@click.option("--load-wait", "load_wait_s", type=click.FloatRange(min=0),
              help="Seconds a call for an idle model (scaled to zero) waits for a replica to load, "
                   "then 503 with Retry-After (SAX_LOAD_WAIT, default 300; 0: answer 503 at once).")
@click.option("--graceful-timeout", "graceful_timeout_s", type=int,
              help="Seconds in-flight requests may drain on SIGTERM (default 30).")
@click.option("--log-level", default="INFO", show_default=True)
def main(log_level: str, aliases: tuple[str, ...], api_keys: str | None, allowed_origins: str | None,
         **flags: Any) -> None:
    """Run a Saxplane HTTP frontend (Saxml HTTP API + OpenAI API).

    Example: python -m http_frontend --port 8888 --admin localhost:10000
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        parsed = parse_aliases(aliases) if aliases else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--alias") from None
    split = (lambda v: tuple(x.strip() for x in v.split(",") if x.strip()) if v is not None else None)
    settings = FrontendSettings.from_env(**flags, aliases=parsed, api_keys=split(api_keys),
                                         allowed_origins=split(allowed_origins))
    serve(settings)


if __name__ == "__main__":
    main()
