#!/usr/bin/env bash
# Start a throwaway PostgreSQL 15 on 127.0.0.1:$PGPORT with trust auth, as the postgres user.
# Prints the SQLAlchemy URL of its admin database. Used by .ci/run and by developers:
#   export HYBRIDLAB_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)
set -euo pipefail
# A free port unless PGPORT is given: another server (a developer's) may hold the usual one.
PGPORT="${PGPORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PGDATA="$(mktemp -d /tmp/hybridlab-pg.XXXXXX)"
chown postgres:postgres "$PGDATA"
su postgres -s /bin/sh -c "$PGBIN/initdb -D $PGDATA --auth=trust -U postgres" > "$PGDATA.initdb.log" 2>&1
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $PGDATA -w -l $PGDATA/server.log \
  -o '-p $PGPORT -k $PGDATA -c listen_addresses=127.0.0.1 -c max_connections=200' start" >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
