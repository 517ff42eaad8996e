#!/usr/bin/env bash
# Install and start a PostgreSQL server on loopback for the shared-storage sweep test.
# Prints exactly one line on stdout, the test URL; every other message goes to stderr
# (pg_ctlcluster, for one, prints "Removed stale pid file." on a reused machine).
# Used by .ci/run; developers: `export STVNET_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)`. Needs root.
set -euo pipefail
start_server() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
  fi
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h | grep -q online; then
    pg_lsclusters -h | grep -q . || pg_createcluster "$version" main
    if ! pg_ctlcluster "$version" main start; then
      # A server killed hard leaves its socket lock behind: drop locks whose owner is gone, retry once.
      for lock in /var/run/postgresql/.s.PGSQL.*.lock; do
        [ -e "$lock" ] && ! kill -0 "$(head -n 1 "$lock")" 2>/dev/null && rm -f "$lock"
      done
      pg_ctlcluster "$version" main start
    fi
  fi
  su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'stvnet') THEN CREATE ROLE stvnet LOGIN PASSWORD 'stvnet'; END IF; END \\\$\\\$;\""
  su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = 'optuna'\"" | grep -q 1 || su postgres -c "createdb -O stvnet optuna"
}
# The server must not inherit stdout: a caller reading it with $(...) would wait for the daemon.
start_server >&2
echo "postgresql://stvnet:stvnet@127.0.0.1:5432/optuna"
