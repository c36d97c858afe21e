#!/bin/sh
# Saxplane image entrypoint: `saxplane-entrypoint PART [ARGS...]` runs one part of the cell.
# Every part reads its SAX_* variables (flags given here win over them); see deploy/README.md.
set -eu

usage() {
  cat <<'USAGE'
usage: saxplane-entrypoint PART [ARGS...]

  admin           python -m admin_server    SAX_ROOT, SAX_CELL, SAX_DB_URL, SAX_ADMIN_PORT (10000), ...
  model-server    python -m model_server    SAX_ADMIN, SAX_ADVERTISE, SAX_MODEL_SERVER_PORT (10001), ...
  frontend        python -m http_frontend   SAX_ADMIN, SAX_FRONTEND_PORT (8888), SAX_API_KEYS, ...
  saxutil ARGS    the saxutil CLI           SAX_ADMIN, SAX_ADMIN_TOKEN
  migrate [ARGS]  saxutil migrate           SAX_DB_URL: the admin database's Alembic upgrade to head
  healthcheck     GET the running part's /healthz (exit 0 when healthy; one-shot parts always pass)
  help            this text

Anything else runs as a command, e.g. `saxplane-entrypoint python -c ...` or `bash`.
USAGE
}

# The port a part listens on: --port N or --port=N among its arguments, else $1.
listen_port() {
  _port=$1
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) if [ $# -gt 1 ]; then _port=$2; fi ;;
      --port=*) _port=${1#--port=} ;;
    esac
    shift
  done
  printf '%s' "$_port"
}

# Tells `healthcheck` (a separate process, e.g. Docker's HEALTHCHECK) where this part answers.
record_health() {
  printf 'http://127.0.0.1:%s/healthz\n' "$1" >"${SAX_HEALTH_FILE:-/tmp/saxplane-healthz}" 2>/dev/null || true
}

part=${1:-help}
if [ $# -gt 0 ]; then shift; fi

case "$part" in
  admin|admin-server)
    record_health "$(listen_port "${SAX_ADMIN_PORT:-10000}" "$@")"
    exec python -m admin_server "$@"
    ;;
  model-server|model_server)
    record_health "$(listen_port "${SAX_MODEL_SERVER_PORT:-10001}" "$@")"
    exec python -m model_server "$@"
    ;;
  frontend|http-frontend|http_frontend)
    record_health "$(listen_port "${SAX_FRONTEND_PORT:-8888}" "$@")"
    exec python -m http_frontend "$@"
    ;;
  saxutil)
    exec saxutil "$@"
    ;;
  migrate)
    exec saxutil migrate "$@"
    ;;
  healthcheck)
    exec python -c '
import os, sys, urllib.request
path = os.environ.get("SAX_HEALTH_FILE") or "/tmp/saxplane-healthz"
try:
    with open(path) as f:
        url = f.read().strip()
except FileNotFoundError:
    sys.exit(0)  # a one-shot part (saxutil, migrate) or nothing started yet: nothing to check
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("SAX_HEALTH_TIMEOUT") or 4)) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    print(f"unhealthy: {url}: {e}", file=sys.stderr)
    sys.exit(1)
'
    ;;
  help|-h|--help)
    usage
    ;;
  *)
    exec "$part" "$@"
    ;;
esac
