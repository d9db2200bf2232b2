#!/bin/sh
# PostgreSQL for the containerised mesh (scripts/images.sh builds the image
# from this machine's Debian postgresql package). It follows the official
# image's conventions, so the compose file works with either: POSTGRES_USER,
# POSTGRES_PASSWORD, PGDATA, and *.sql files in /docker-entrypoint-initdb.d
# run once, when the data directory is first created.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
bin=/usr/lib/postgresql/15/bin

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "POSTGRES_PASSWORD must be set" >&2
        exit 1
    fi
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C
    rm -f "$pwfile"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] || continue
        echo "running $f"
        "$bin/postgres" --single -D "$PGDATA" -j postgres <"$f" >/dev/null
    done
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c jit=off "$@"
