#!/bin/bash
# Entrypoint of the local PostgreSQL stand-in image (see Dockerfile): on first
# start, initialise PGDATA like the official image does, then exec the server.
set -euo pipefail

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"

if [ "${1:-}" = "postgres" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: POSTGRES_PASSWORD must be set to initialise the database" >&2
        exit 1
    fi
    echo "initialising database in $PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    # Like the official image: listen on every interface, password auth from
    # anywhere (the compose network is the only way in).
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"

    # A temporary server on the Unix socket only, so nothing connects (and
    # pg_isready -h 127.0.0.1 fails) until initialisation is finished.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres)
    if [ "$POSTGRES_DB" != "postgres" ]; then
        "${psql[@]}" -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sql) echo "running $f"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
            *.sh) echo "running $f"; bash "$f" ;;
            *) ;; # also the unexpanded glob of an empty directory
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "database initialised"
fi

exec "$@"
