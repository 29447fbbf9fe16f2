#!/usr/bin/env bash
# Starts a throw-away PostgreSQL for the tests, as root on a fresh Debian
# machine: installs the server from Debian's packages if needed, creates a
# cluster owned by `postgres` under $TQ_PG_DIR, listens on 127.0.0.1:$TQ_PG_PORT,
# creates a role and a database, and prints the URL on stdout.
#
#   .ci/postgres.sh start   # prints postgres://tq:tq@127.0.0.1:5433/tq_test
#   .ci/postgres.sh stop
set -euo pipefail

dir=${TQ_PG_DIR:-/tmp/task-queue-pg}
port=${TQ_PG_PORT:-5433}
url="postgres://tq:tq@127.0.0.1:${port}/tq_test"

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && echo "$d"
}

as_pg() { runuser -u postgres -- "$@"; }

case "${1:-start}" in
start)
  if [ -z "$(bindir)" ]; then
    echo "installing PostgreSQL from Debian packages" >&2
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
  fi
  bin=$(bindir) || { echo "PostgreSQL is not installed and could not be" >&2; exit 1; }
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >&2
  fi
  if ! as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start \
      -o "-p $port -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=300 -c shared_buffers=256MB" >&2 \
      || { cat "$dir/server.log" >&2; exit 1; }
  fi
  psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'tq'")" != "1" ]; then
    "${psql[@]}" -c "CREATE ROLE tq LOGIN PASSWORD 'tq' CREATEDB" >&2
  fi
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'tq_test'")" != "1" ]; then
    "${psql[@]}" -c "CREATE DATABASE tq_test OWNER tq" >&2
  fi
  echo "$url"
  ;;
stop)
  bin=$(bindir) || exit 0
  if [ -f "$dir/PG_VERSION" ]; then
    as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >&2 || true
  fi
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
