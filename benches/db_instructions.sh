#!/usr/bin/env bash
# Instructions per request of the sessiongate process on the `db` engine on
# PostgreSQL (and, with ENGINE=memory, the memory engine), counted by
# valgrind's callgrind: a number the shared machine's load does not move,
# for comparing two builds of the store code (requests/s move by tens of
# percent between runs here).
#
#     benches/db_instructions.sh BIN...      # each BIN a sessiongate binary
#     DURATION=20 CONNECTIONS=16 benches/db_instructions.sh /tmp/sg-main target/release/sessiongate
#
# For each binary: sessiongate runs under callgrind (one worker,
# SESSIONGATE_WORKERS=1) in front of nginx (as in engines.sh) with a fresh
# PostgreSQL 15 (initdb in a temporary directory); per path (`/` the read
# path, `/write` the write path: nginx sends X-Session-Update) it warms up
# with 300 requests, zeroes the counters, runs wrk for DURATION seconds
# over SESSIONS live session cookies, dumps the counters and prints
# user-space instructions of the proxy process per completed request (the
# kernel's share, PostgreSQL's and nginx's are not counted). Requests still
# in flight when wrk stops (at most CONNECTIONS) blur the count by well
# under 1 %.
#
# Needs valgrind (callgrind_control, callgrind_annotate), wrk, curl, nginx,
# PostgreSQL 15 binaries in PG_BIN.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-20}
CONNECTIONS=${CONNECTIONS:-16}
SESSIONS=${SESSIONS:-64}
ENGINE=${ENGINE:-postgres}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
(($# > 0)) || {
    echo "usage: $0 SESSIONGATE_BINARY..." >&2
    exit 2
}
for t in valgrind callgrind_control callgrind_annotate wrk curl nginx "$PG_BIN/initdb"; do
    command -v "$t" >/dev/null || {
        echo "db_instructions.sh: $t not found" >&2
        exit 1
    }
done

WORK=$(mktemp -d /tmp/sg-dbinstr.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # what command...
    local what=$1 i
    shift
    for ((i = 0; i < 600; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$what not ready after 60 s" >&2
    exit 1
}

P_BACKEND=$(port)
mkdir -p "$WORK/nginx/tmp"
NGINX_USER=""
[[ $(id -u) == 0 ]] && NGINX_USER="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$P_BACKEND;
        location / { return 200 "hello from the backend\n"; }
        location /write {
            add_header X-Session-Update '{"n": \$connection_requests, "r": "\$request_id"}' always;
            return 200 "hello from the backend\n";
        }
    }
}
EOF
nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_for nginx curl -sf "http://127.0.0.1:$P_BACKEND/"

STORE='engine = "memory"'
if [[ $ENGINE == postgres ]]; then
    P_PG=$(port)
    mkdir -p "$WORK/pg" "$WORK/pgsock"
    AS_PG=()
    if [[ $(id -u) == 0 ]]; then
        chown postgres:postgres "$WORK/pg" "$WORK/pgsock"
        AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" --auth=trust -U postgres >"$WORK/initdb.log" 2>&1
    "${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$P_PG" -k "$WORK/pgsock" \
        -c listen_addresses=127.0.0.1 >"$WORK/pg.log" 2>&1 &
    PIDS+=($!)
    wait_for postgres "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$P_PG"
    STORE="engine = \"db\"
url = \"postgres://postgres@127.0.0.1:$P_PG/postgres\""
fi

cat >"$WORK/rotate.lua" <<'EOF'
local cookies = {}
for line in io.lines(os.getenv("COOKIES")) do cookies[#cookies + 1] = line end
local path = os.getenv("SG_PATH")
local i = 0
request = function()
    i = i % #cookies + 1
    return wrk.format("GET", path, { ["Cookie"] = cookies[i] })
end
EOF

n=0
for bin in "$@"; do
    n=$((n + 1))
    P_SG=$(port)
    cat >"$WORK/sg.toml" <<EOF
[server]
listen = "127.0.0.1:$P_SG"
tls = false
shutdown_grace = "1s"

[session]
secret_key = "sessiongate-engine-benchmark-secret-0123456789"

[store]
$STORE
# valgrind slows the proxy down some fifty times: no request may time out.
timeout = "60s"

[[route]]
name = "app"
path = "/"
upstream = "http://127.0.0.1:$P_BACKEND"
EOF
    [[ $ENGINE == postgres ]] && "$bin" migrate --config "$WORK/sg.toml" >/dev/null
    SESSIONGATE_WORKERS=1 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$n.out" \
        "$bin" run --config "$WORK/sg.toml" >"$WORK/sg-$n.log" 2>&1 &
    VG=$!
    wait_for "sessiongate under valgrind ($bin)" curl -sf "http://127.0.0.1:$P_SG/"
    : >"$WORK/cookies"
    for ((i = 0; i < SESSIONS; i++)); do
        curl -s -D - -o /dev/null "http://127.0.0.1:$P_SG/write" | tr -d '\r' |
            sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1 >>"$WORK/cookies"
    done
    dumps=0
    for path in / /write; do
        COOKIES="$WORK/cookies" SG_PATH=$path wrk -t1 -c"$CONNECTIONS" -d3s -s "$WORK/rotate.lua" \
            "http://127.0.0.1:$P_SG$path" >/dev/null
        callgrind_control -z "$VG" >/dev/null 2>&1
        out=$(COOKIES="$WORK/cookies" SG_PATH=$path wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
            -s "$WORK/rotate.lua" "http://127.0.0.1:$P_SG$path")
        callgrind_control -d "$VG" >/dev/null 2>&1
        dumps=$((dumps + 1))
        f="$WORK/cg-$n.out.$dumps"
        for _ in $(seq 100); do [[ -s $f ]] && break; sleep 0.1; done
        reqs=$(sed -n 's/^ *\([0-9]*\) requests in .*/\1/p' <<<"$out")
        bad=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' <<<"$out")
        total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
        printf '%s\t%s\t%s requests (%s non-2xx)\t%s instructions/request\n' "$bin" "$ENGINE$path" \
            "$reqs" "${bad:-0}" "$(awk -v t="$total" -v r="$reqs" 'BEGIN {printf "%.0f", t / r}')"
    done
    kill "$VG"
    wait "$VG" 2>/dev/null || true
done
