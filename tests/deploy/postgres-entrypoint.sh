#!/bin/sh
# The PostgreSQL stand-in's entrypoint (tests/deploy/standins.sh): the part of the official
# image's interface that compose.yaml uses. POSTGRES_USER (default postgres), POSTGRES_PASSWORD
# (required), POSTGRES_DB (default: the user's name); data in $PGDATA
# (/var/lib/postgresql/data), initialised on first start; then the server listens on every
# address with password (SCRAM) logins, as the official image does. Runs as root only to hand
# the data directory to the postgres user, then drops to it.
set -eu
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-postgres}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        # Single-user mode: no server is listening while the database is made.
        printf 'CREATE DATABASE "%s";\n' "$(printf '%s' "$db" | sed 's/"/""/g')" \
            | postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "stand-in entrypoint: initialised $PGDATA (user $user, database $db)"
fi

if [ "${1:-postgres}" = postgres ]; then
    shift $(($# > 0 ? 1 : 0))
    exec postgres -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql,/tmp "$@"
fi
exec "$@"
