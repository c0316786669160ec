#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: a number that
# does not move with the machine's load, for comparing two commits of the
# hot path (requests/s on a shared 2-core machine move by tens of percent
# between runs; this moves by well under 1%).
#
#     benches/instructions.sh            # 20000 requests per scenario
#     N=5000 benches/instructions.sh     # quicker
#
# It builds sessiongate and the bundled backend (examples/bench_backend.rs)
# with --release, runs sessiongate under callgrind with one worker
# (SESSIONGATE_WORKERS=1) in front of the bundled backend, and for each
# scenario sends 2000 warm-up requests, zeroes the counters, sends N
# requests with h2load (HTTP/1.1, 16 connections) and dumps the counters.
# It prints user-space instructions per request of the proxy process:
# the kernel's share (system calls, TCP) is not counted, and neither is
# the client's or the backend's.
#
# Scenarios: the session=false route, the read path (live session cookie,
# no write), the write path (the backend sends X-Session-Update on /write).
#
# The baseline, last: nginx's plain proxy_pass (one worker, master_process
# off, access_log off, keepalive to the same backend) under callgrind in the
# same way, when nginx is installed (NGINX=0 skips it). nginx does less: no
# session, no access log, no metrics.
#
# Needs valgrind, h2load (Debian: nghttp2-client) and curl.
# Environment: N (requests, default 20000), KEEP=1 keeps the callgrind
# files and logs, CARGO_TARGET_DIR as for cargo, BIN (a sessiongate binary
# to measure instead of building one), NGINX (1 by default when nginx is
# installed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
export CARGO_TARGET_DIR="$TARGET_DIR"
cd "$ROOT"
N=${N:-20000}
KEEP=${KEEP:-0}
[[ $N =~ ^[0-9]+$ ]] && ((N >= 100)) || {
    echo "N=$N: expected an integer >= 100" >&2
    exit 1
}
for tool in valgrind callgrind_control callgrind_annotate h2load curl; do
    command -v "$tool" >/dev/null || {
        echo "instructions.sh: $tool is required (Debian: valgrind, nghttp2-client, curl)" >&2
        exit 1
    }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sessiongate-instr.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $KEEP == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Two commands: with the example in the same one, sessiongate would get the
# dev-dependencies' features (tokio's test-util) that `cargo build --release`
# does not give it.
# BIN: a sessiongate binary built otherwise (e.g. --no-default-features, the
# system allocator) is measured instead of this build.
if [[ -z ${BIN:-} ]]; then cargo build --release --bin sessiongate >&2; fi
cargo build --release --example bench_backend >&2
SG=${BIN:-"$TARGET_DIR/release/sessiongate"}
BACKEND="$TARGET_DIR/release/examples/bench_backend"

port() { # a free port of 127.0.0.1 (asked of the kernel)
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
P_BACKEND=$(port)
P_SG=$(port)

"$BACKEND" "127.0.0.1:$P_BACKEND" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/sg.toml" <<EOF
[server]
listen = "127.0.0.1:$P_SG"
tls = false
shutdown_grace = "1s"

[session]
secret_key = "sessiongate-instructions-benchmark-secret-0123"

[store]
engine = "memory"

[[route]]
name = "static"
path = "/static"
upstream = "http://127.0.0.1:$P_BACKEND"
session = false

[[route]]
name = "app"
path = "/"
upstream = "http://127.0.0.1:$P_BACKEND"
EOF
SESSIONGATE_WORKERS=1 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
    "$SG" run --config "$WORK/sg.toml" >"$WORK/sg.log" 2>&1 &
VG=$!
PIDS+=("$VG")

# wait_up name url log: waits for the server under valgrind (VG) to answer.
wait_up() {
    local _
    for _ in $(seq 300); do
        curl -s -o /dev/null "$2" && return 0
        kill -0 "$VG" 2>/dev/null || break
        sleep 0.1
    done
    echo "$1 did not start under valgrind:" >&2
    tail -20 "$3" >&2
    exit 1
}
wait_up sessiongate "http://127.0.0.1:$P_SG/static/" "$WORK/sg.log"
COOKIE=$(curl -s -D - -o /dev/null "http://127.0.0.1:$P_SG/write" |
    tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1)
[[ -n $COOKIE ]] || {
    echo "no session cookie from /write" >&2
    exit 1
}

# measure label path [cookie] -> "label instructions/request"
# (of the process under callgrind: VG, listening on PORT, dumping to CG)
dumps=0
PORT=$P_SG
CG="$WORK/cg.out"
measure() {
    local label=$1 path=$2 cookie=${3:-}
    h2load --h1 -n 2000 -c 16 ${cookie:+-H "cookie: $cookie"} "http://127.0.0.1:$PORT$path" >/dev/null
    callgrind_control -z "$VG" >/dev/null 2>&1
    local out
    out=$(h2load --h1 -n "$N" -c 16 ${cookie:+-H "cookie: $cookie"} "http://127.0.0.1:$PORT$path")
    grep -q "^requests: $N total, $N started, $N done, $N succeeded" <<<"$out" || {
        echo "h2load: not every request succeeded on $path:" >&2
        echo "$out" >&2
        exit 1
    }
    callgrind_control -d "$VG" >/dev/null 2>&1
    dumps=$((dumps + 1))
    local f="$CG.$dumps" total
    for _ in $(seq 100); do [[ -s $f ]] && break; sleep 0.1; done
    total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    [[ -n $total ]] || {
        echo "no callgrind totals in $f" >&2
        exit 1
    }
    printf '| %s | %s | %d |\n' "$label" "$path" $((total / N))
}

echo
echo "Instructions per request (callgrind, user space of the proxy, 1 worker, $N requests, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -z $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]] || echo ' + uncommitted changes'))"
echo
echo "| scenario | path | instructions/request |"
echo "| --- | --- | ---: |"
measure "session=false route" /static/
measure "read path (live session)" / "$COOKIE"
measure "write path (X-Session-Update every request)" /write "$COOKIE"

NGINX=${NGINX:-$(command -v nginx >/dev/null && echo 1 || echo 0)}
if [[ $NGINX == 1 ]]; then
    P_NGINX=$(port)
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log $WORK/nginx/error.log;
pid $WORK/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    upstream backend { server 127.0.0.1:$P_BACKEND; keepalive 64; }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-nginx.out" \
        nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
    VG=$!
    PIDS+=("$VG")
    wait_up nginx "http://127.0.0.1:$P_NGINX/" "$WORK/nginx.log"
    PORT=$P_NGINX
    CG="$WORK/cg-nginx.out"
    dumps=0
    measure "baseline: nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///') proxy_pass, access_log off" /
fi
