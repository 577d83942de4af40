# shellcheck shell=bash
# Sourced by scripts/test.sh (and usable by hand): starts a throwaway PostgreSQL cluster from the
# system's binaries, installing them first when missing (apt-get, as root), and exports
# DATABASE_URL plus the CONTACT_SYNC_TEST_PG* variables the restart tests use. The cluster is
# stopped and deleted when the calling shell exits.

pg_find_bin() {
    PG_BIN=""
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && PG_BIN="$d"
    done
    [ -n "$PG_BIN" ]
}

pg_throwaway_start() {
    if ! pg_find_bin; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
            echo ">> PostgreSQL not found: installing it with apt-get" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        fi
        pg_find_bin || { echo "PostgreSQL server binaries not found and cannot be installed (need root and apt-get)" >&2; return 1; }
    fi
    PG_TMP=$(mktemp -d /tmp/contact-sync-pg.XXXXXX)
    PG_RUN=()
    if [ "$(id -u)" = "0" ]; then
        # Postgres refuses to run as root.
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$PG_TMP"
        PG_RUN=(runuser -u postgres --)
    fi
    local port
    for port in $(seq 55432 55632); do
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    done
    PG_PORT=$port
    "${PG_RUN[@]}" "$PG_BIN/initdb" -D "$PG_TMP/data" --auth=trust --username=postgres -E UTF8 --no-locale >"$PG_TMP/initdb.log" 2>&1 \
        || { cat "$PG_TMP/initdb.log" >&2; return 1; }
    cat >>"$PG_TMP/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_TMP'
max_connections = ${PG_MAX_CONNECTIONS:-400}
shared_buffers = 256MB
${PG_EXTRA_CONF:-}
CONF
    # A port found free can be taken before the server binds it (a cluster that was just
    # stopping, another run): then try the next free one.
    local attempt
    for attempt in 1 2 3 4 5; do
        "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 start >/dev/null && break
        if [ "$attempt" = 5 ] || ! grep -q "could not bind\|could not create any TCP/IP sockets" "$PG_TMP/server.log"; then
            cat "$PG_TMP/server.log" >&2
            return 1
        fi
        for port in $(seq $((PG_PORT + 1)) 55632); do
            (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
        done
        PG_PORT=$port
        echo "port = $PG_PORT" >>"$PG_TMP/data/postgresql.conf"
        : >"$PG_TMP/server.log"
    done
    export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    export CONTACT_SYNC_TEST_PGBIN="$PG_BIN" CONTACT_SYNC_TEST_PGDATA="$PG_TMP/data"
    if [ "$(id -u)" = "0" ]; then export CONTACT_SYNC_TEST_PGUSER=postgres; fi
    trap pg_throwaway_stop EXIT
    echo ">> throwaway PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG_TMP)" >&2
}

pg_throwaway_stop() {
    if [ -n "${PG_TMP:-}" ] && [ -d "$PG_TMP/data" ]; then
        "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_TMP"
    fi
}
