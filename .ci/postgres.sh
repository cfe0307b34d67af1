# Sourced by .ci/run: a throwaway PostgreSQL server on loopback for the tests that need one
# (tests/postgres.py; `basin tune` workers sharing a study). Installs the distribution's
# server (Debian: apt-get install postgresql) when its binaries are missing, initialises a
# cluster in a temporary directory owned by the postgres user (the server refuses to run as
# root), starts it on 127.0.0.1 only, creates the database basin, exports
# BASIN_TEST_POSTGRES_URL and stops the server when the calling shell exits.
# Usage: . .ci/postgres.sh          (stand-alone check: bash .ci/postgres.sh --check)

_basin_pg_bindir() {
    local d
    for d in "$(dirname "$(readlink -f "$(command -v initdb || echo /nonexistent)")")" \
        $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4,4nr); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/createdb" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

basin_pg_start() {
    local bin port dir as=()
    if ! bin=$(_basin_pg_bindir); then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true
        fi
        if ! bin=$(_basin_pg_bindir); then
            echo "postgres.sh: no PostgreSQL server binaries; the PostgreSQL tests will skip (fail under CI=1)" >&2
            [ "$(id -u)" != 0 ]  # as root the install was possible: failing it fails the run
            return
        fi
    fi
    dir=$(mktemp -d /tmp/basin-ci-pg.XXXXXX)
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres: "$dir"
        as=(runuser -u postgres --)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd "$dir" && "${as[@]}" "$bin/initdb" -D "$dir/data" -U basin --auth=trust -E UTF8 --locale=C --no-sync >/dev/null) || return 1
    (cd "$dir" && "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-k $dir -h 127.0.0.1 -p $port -c fsync=off -c max_connections=200" start >/dev/null) \
        || { cat "$dir/server.log" >&2; return 1; }
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U basin basin || return 1
    export BASIN_TEST_POSTGRES_URL="postgresql+psycopg://basin@127.0.0.1:$port/basin"
    _BASIN_PG_STOP="cd /; ${as[*]} '$bin/pg_ctl' -D '$dir/data' -m fast -w stop >/dev/null 2>&1; rm -rf '$dir'"
    trap 'eval "$_BASIN_PG_STOP"' EXIT
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (BASIN_TEST_POSTGRES_URL)" >&2
}

if [ "${1:-}" = "--check" ]; then  # bash .ci/postgres.sh --check: start, query, stop
    set -euo pipefail
    basin_pg_start
    bin=$(_basin_pg_bindir)
    "$bin/psql" "${BASIN_TEST_POSTGRES_URL/+psycopg/}" -Atc "select version()"
else
    basin_pg_start
fi
