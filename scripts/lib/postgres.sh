# shellcheck shell=bash
# Starts a throwaway PostgreSQL from the locally installed binaries (initdb,
# pg_ctl, postgres): a temporary data directory, a free port on 127.0.0.1,
# stopped and deleted when the calling script exits, on success or failure.
#
# Usage (from a bash script):   source scripts/lib/postgres.sh; start_throwaway_postgres
# Afterwards DATABASE_URL points at a database named "tasker".
#
# PostgreSQL refuses to run as root; when we are root, the server runs as the
# "postgres" user (which the Debian packages create).

_tasker_pg_dir=""
_tasker_pg_run=()

_tasker_pg_find_bin() {
    local name=$1 dir
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/$name" ]; then
            echo "$dir/$name"
            return
        fi
    done
    echo "error: $name not found; install PostgreSQL (e.g. apt-get install postgresql)" >&2
    return 1
}

_tasker_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

stop_throwaway_postgres() {
    if [ -n "$_tasker_pg_dir" ] && [ -d "$_tasker_pg_dir" ]; then
        "${_tasker_pg_run[@]}" "$(_tasker_pg_find_bin pg_ctl)" -D "$_tasker_pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$_tasker_pg_dir"
    fi
    _tasker_pg_dir=""
}

# The running throwaway server's directory (its data is in data/).
throwaway_postgres_dir() { echo "$_tasker_pg_dir"; }

# Runs a command as the user that owns the throwaway server's files.
as_throwaway_postgres_owner() { "${_tasker_pg_run[@]}" "$@"; }

# Stops the throwaway server and keeps its data (still removed on exit), for
# commands that run PostgreSQL on a copy of it in single-user mode.
halt_throwaway_postgres() {
    "${_tasker_pg_run[@]}" "$(_tasker_pg_find_bin pg_ctl)" -D "$_tasker_pg_dir/data" -m fast -w stop >/dev/null
}

# Copies the halted server's data to $_tasker_pg_dir/NAME.
throwaway_postgres_copy_data() { "${_tasker_pg_run[@]}" cp -a "$_tasker_pg_dir/data" "$_tasker_pg_dir/$1"; }

start_throwaway_postgres() {
    local initdb pg_ctl port attempt
    initdb=$(_tasker_pg_find_bin initdb)
    pg_ctl=$(_tasker_pg_find_bin pg_ctl)
    _tasker_pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/tasker-pg.XXXXXX")
    trap stop_throwaway_postgres EXIT
    trap 'exit 130' INT TERM

    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || { echo "error: running as root needs a 'postgres' user" >&2; return 1; }
        chown postgres "$_tasker_pg_dir"
        chmod 755 "$_tasker_pg_dir"
        _tasker_pg_run=(runuser -u postgres --)
    else
        _tasker_pg_run=()
    fi

    "${_tasker_pg_run[@]}" "$initdb" -D "$_tasker_pg_dir/data" -U tasker --auth=trust -E UTF8 --no-locale \
        >"$_tasker_pg_dir/initdb.log" 2>&1 || { cat "$_tasker_pg_dir/initdb.log" >&2; return 1; }

    # A port can be taken between choosing and binding it: retry a few times.
    for attempt in 1 2 3 4 5; do
        port=$(_tasker_pg_free_port)
        if "${_tasker_pg_run[@]}" "$pg_ctl" -D "$_tasker_pg_dir/data" -w -t 60 -l "$_tasker_pg_dir/server.log" \
            -o "-p $port -k $_tasker_pg_dir -c listen_addresses=127.0.0.1 -c max_connections=400 \
                -c shared_preload_libraries=pg_stat_statements -c shared_buffers=256MB \
                ${TASKER_PG_OPTIONS:-}" start >/dev/null; then
            break
        fi
        if [ "$attempt" = 5 ]; then
            cat "$_tasker_pg_dir/server.log" >&2
            return 1
        fi
    done

    "${_tasker_pg_run[@]}" "$(dirname "$pg_ctl")/createdb" -h 127.0.0.1 -p "$port" -U tasker tasker 2>/dev/null \
        || psql -h 127.0.0.1 -p "$port" -U tasker -d postgres -qc 'CREATE DATABASE tasker' >/dev/null
    export DATABASE_URL="postgres://tasker@127.0.0.1:$port/tasker"
    export TASKER_PG_LOG="$_tasker_pg_dir/server.log"
    echo "PostgreSQL for this run: $DATABASE_URL (data in $_tasker_pg_dir, removed on exit)" >&2
}
