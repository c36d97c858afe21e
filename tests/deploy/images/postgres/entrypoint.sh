#!/bin/sh
# First start on an empty data directory: initdb with POSTGRES_USER/POSTGRES_PASSWORD, then
# create POSTGRES_DB; every start: run postgres on POSTGRES_LISTEN (default all) and PGPORT.
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}" "${PGPORT:=5432}"
export PGPORT
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$pw"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --auth-host=scram-sha-256 --auth-local=trust \
    --encoding=UTF8 --locale=C.UTF-8
  rm -f "$pw"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start
  if [ "$POSTGRES_DB" != "postgres" ]; then
    createdb -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
  fi
  pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec postgres -D "$PGDATA" -k /tmp -c listen_addresses="${POSTGRES_LISTEN:-*}"
