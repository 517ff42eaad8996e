#!/usr/bin/env bash
# Install and start a PostgreSQL server on loopback for the shared-storage sweep test; prints its URL.
# Used by .ci/run (and by developers: `eval "$(bash .ci/postgres.sh)"`). Needs root and Debian's packages.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q online; then
  pg_lsclusters -h | grep -q . || pg_createcluster "$version" main >/dev/null
  pg_ctlcluster "$version" main start
fi
su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'stvnet') THEN CREATE ROLE stvnet LOGIN PASSWORD 'stvnet'; END IF; END \\\$\\\$;\"" >/dev/null
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = 'optuna'\"" | grep -q 1 || su postgres -c "createdb -O stvnet optuna"
echo "export STVNET_TEST_POSTGRES_URL=postgresql://stvnet:stvnet@127.0.0.1:5432/optuna"
