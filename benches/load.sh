#!/usr/bin/env bash
# Load benchmark of sessiongate against nginx, in one command:
#
#     benches/load.sh
#
# What it does (everything on 127.0.0.1, ports chosen free, all stopped at exit):
#  1. checks for curl, openssl, wrk, h2load (nghttp2-client) and nginx; when
#     run as root with apt-get, installs the missing ones from Debian;
#  2. builds sessiongate and the bundled backend (examples/bench_backend.rs)
#     with --release, and sessiongate again with profile-guided optimisation
#     (scripts/build-pgo.sh, the build to deploy; BUILD=release skips it);
#  3. makes a self-signed certificate with openssl in a temporary directory;
#  4. starts the backend: nginx serving a short body (its /write location adds
#     `X-Session-Update: {"n": <counter>}`; `reuseport`, so each proxy's
#     upstream connections are spread over its workers), or the bundled
#     backend when nginx is missing (the nginx rows are then skipped, loudly);
#  5. starts nginx as a plain proxy_pass reverse proxy to that backend with
#     upstream keep-alive (plain HTTP, and TLS with HTTP/1.1 and h2), a second
#     nginx that also sends the nine request headers sessiongate adds on the
#     read path (X-Session*, X-Forwarded-*: the same work for the backend), and
#     sessiongate processes (plain HTTP and TLS, and plain HTTP on the plain
#     release build beside the PGO one; memory store; `/static` is a
#     `session = false` route, `/` a session route);
#  6. gets a live session cookie from each sessiongate (one request to /write);
#  7. runs every scenario round-robin, ROUNDS times DURATION seconds each, at
#     CONNECTIONS connections (wrk for HTTP/1.1, h2load for h2), and reports
#     the median requests/s, p50 and p99 latency, and the CPU time (user +
#     system, from /proc) the proxy's and the backend's processes spent per
#     request: on a machine the load generator, the backend and the proxy
#     share, requests/s follows the sum of the three;
#  8. runs examples/mem_per_session.rs (resident bytes per stored session);
#  9. prints a table and writes it, with the command, the machine, the date,
#     the versions and the ratios, into BENCHMARKS.md between the
#     "BEGIN load.sh" / "END load.sh" markers (the rest of the file is kept).
#
# Environment (all optional):
#   DURATION=10      seconds per measurement
#   ROUNDS=3         rounds over all scenarios (the median is reported)
#   CONNECTIONS=64   concurrent connections
#   THREADS=2        wrk / h2load threads
#   WARMUP=2         seconds of discarded warm-up per scenario before round 1 (0: none)
#   BACKEND=auto     auto | nginx | bundled
#   BUILD=pgo        pgo: the sessiongate rows run the build of
#                    scripts/build-pgo.sh, and one more row runs the read path
#                    on the plain `cargo build --release` binary beside it;
#                    release: every row runs the plain release build
#   INSTALL=1        0: never run apt-get
#   MEM=1            0: skip the memory-per-session measurement
#   MEM_SESSIONS=1000000
#   OUT=BENCHMARKS.md  where to write the report ("-": do not write)
#   KEEP=0           1: keep the temporary directory (configs, logs, raw output)
#   ONE_WORKER=1     0: skip the two one-worker rows (nginx worker_processes 1,
#                    sessiongate SESSIONGATE_WORKERS=1), which show what the
#                    worker count does on a machine the load generator shares
#   PINNED=1         0: skip the two pinned rows (sessiongate with
#                    SESSIONGATE_CPU_AFFINITY=auto, nginx with
#                    worker_cpu_affinity auto): each worker on a CPU of its own
#   ONLY=""          scenario ids to run, space-separated (for example
#                    ONLY="nginx nginx_hdr sg_read" with more ROUNDS, to settle
#                    a few percent between two rows); ratios of rows not run
#                    print n/a. Ids: backend nginx nginx_hdr nginx_log sg_static sg_read
#                    sg_read_rel (with the PGO build only) sg_write sg_tls_h1 sg_tls_h2 nginx_tls_h1 nginx_tls_h2
#                    nginx_1w sg_read_1w nginx_pin sg_read_pin sg_read_nolog
#                    sg_write_user sg_write_uid sg_login sg_login_user sg_read_alt (with ALT_BIN)
#   ALT_BIN=""       a second sessiongate binary (for example one built with
#                    `--no-default-features`, the system allocator): one more
#                    read row, sg_read_alt, right after sg_read
#   CARGO_TARGET_DIR as for cargo
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
export CARGO_TARGET_DIR="$TARGET_DIR"
cd "$ROOT"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-2}
BACKEND=${BACKEND:-auto}
BUILD=${BUILD:-pgo}
INSTALL=${INSTALL:-1}
MEM=${MEM:-1}
MEM_SESSIONS=${MEM_SESSIONS:-1000000}
OUT=${OUT:-$ROOT/BENCHMARKS.md}
KEEP=${KEEP:-0}
ONE_WORKER=${ONE_WORKER:-1}
PINNED=${PINNED:-1}
ONLY=${ONLY:-}

say() { printf '[load.sh] %s\n' "$*" >&2; }
die() {
    printf '[load.sh] ERROR: %s\n' "$*" >&2
    exit 1
}
warn_loud() {
    printf '\n[load.sh] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
    printf '[load.sh] !!! %s\n' "$@" >&2
    printf '[load.sh] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
}

int_in() { # name value min max
    [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3 && $2 <= $4)) || die "$1=$2: expected an integer from $3 to $4"
}
int_in DURATION "$DURATION" 1 600
int_in ROUNDS "$ROUNDS" 1 20
int_in CONNECTIONS "$CONNECTIONS" 1 10000
int_in THREADS "$THREADS" 1 64
int_in WARMUP "$WARMUP" 0 60
int_in MEM_SESSIONS "$MEM_SESSIONS" 1 100000000
((THREADS <= CONNECTIONS)) || die "THREADS must not exceed CONNECTIONS"
case $BACKEND in auto | nginx | bundled) ;; *) die "BACKEND=$BACKEND: expected auto, nginx or bundled" ;; esac
case $BUILD in pgo | release) ;; *) die "BUILD=$BUILD: expected pgo or release" ;; esac

COMMAND="DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS THREADS=$THREADS WARMUP=$WARMUP BACKEND=$BACKEND BUILD=$BUILD ONE_WORKER=$ONE_WORKER PINNED=$PINNED${ONLY:+ ONLY=\"$ONLY\"} benches/load.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sessiongate-load.XXXXXX")
chmod 755 "$WORK"
PIDS=()
POLICY_RC_CREATED=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        say "stopping ${#PIDS[@]} process(es) started by this script"
        local pid
        for pid in "${PIDS[@]}"; do
            kill -TERM "$pid" 2>/dev/null || true
        done
        local i
        for pid in "${PIDS[@]}"; do
            for ((i = 0; i < 50; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
            wait "$pid" 2>/dev/null || true
        done
    fi
    if ((POLICY_RC_CREATED)); then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [[ $KEEP == 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools

NGINX_INSTALLED_BY_SCRIPT=0
install_missing() {
    local pkgs=("$@")
    ((${#pkgs[@]})) || return 0
    if [[ $INSTALL != 1 ]]; then
        say "missing: ${pkgs[*]} (INSTALL=0: not installing)"
        return 0
    fi
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        say "missing: ${pkgs[*]} (not root or no apt-get: cannot install them)"
        return 0
    fi
    # Installing nginx must not start a system nginx on port 80: keep
    # services from starting during the install unless a policy already says so.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    say "installing with apt-get: ${pkgs[*]}"
    if ! timeout 600 apt-get update -qq >"$WORK/apt-update.log" 2>&1; then
        say "apt-get update failed (see below); trying the install anyway"
        tail -5 "$WORK/apt-update.log" >&2 || true
    fi
    if ! DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$WORK/apt-install.log" 2>&1; then
        say "apt-get install failed:"
        tail -10 "$WORK/apt-install.log" >&2 || true
    fi
    if ((POLICY_RC_CREATED)); then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
}

NGINX_BIN=$(command -v nginx || true)
[[ -z $NGINX_BIN && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
if [[ $BACKEND != bundled && -z $NGINX_BIN ]]; then
    missing+=(nginx)
fi
install_missing "${missing[@]}"
if [[ -z $NGINX_BIN ]]; then
    NGINX_BIN=$(command -v nginx || true)
    [[ -z $NGINX_BIN && -x /usr/sbin/nginx ]] && NGINX_BIN=/usr/sbin/nginx
    if [[ -n $NGINX_BIN ]]; then
        NGINX_INSTALLED_BY_SCRIPT=1
    fi
fi
command -v curl >/dev/null || die "curl is required"
command -v openssl >/dev/null || die "openssl is required"
command -v wrk >/dev/null || die "wrk is required (Debian: apt-get install wrk)"
HAVE_H2LOAD=1
if ! command -v h2load >/dev/null; then
    HAVE_H2LOAD=0
    warn_loud "h2load not found (Debian: nghttp2-client): the h2 rows are SKIPPED"
fi
USE_NGINX=0
if [[ $BACKEND != bundled ]]; then
    if [[ -n $NGINX_BIN ]]; then
        USE_NGINX=1
    elif [[ $BACKEND == nginx ]]; then
        die "BACKEND=nginx but nginx is not installed and could not be installed"
    else
        warn_loud "nginx is not installed and could not be installed:" \
            "the bundled backend is used and the NGINX ROWS ARE SKIPPED" \
            "(so there is no nginx reference to compare with)"
    fi
fi

# ---------------------------------------------------------------- build

say "building sessiongate and the bundled backend (--release, target dir $TARGET_DIR)"
examples=(--example bench_backend)
if [[ $MEM == 1 ]]; then
    examples+=(--example mem_per_session)
fi
# sessiongate on its own: built in one command with the examples, it would get
# the dev-dependencies' features too (tokio's test-util, whose clock takes a
# lock on every read), which `cargo build --release` does not give it.
cargo build --release --bin sessiongate >&2
cargo build --release "${examples[@]}" >&2
SG_REL_BIN="$TARGET_DIR/release/sessiongate"
BACKEND_BIN="$TARGET_DIR/release/examples/bench_backend"
MEM_BIN="$TARGET_DIR/release/examples/mem_per_session"
[[ -x $SG_REL_BIN && -x $BACKEND_BIN ]] || die "build products not found in $TARGET_DIR/release"
SG_BIN=$SG_REL_BIN
BUILT=release
WANT_SG=1
if [[ -n $ONLY && " $ONLY " != *" sg_"* ]]; then
    WANT_SG=0 # no sessiongate row: no PGO build either
fi
if [[ $BUILD == pgo && $WANT_SG == 1 ]]; then
    say "building sessiongate with profile-guided optimisation (scripts/build-pgo.sh)"
    if PGO_BIN=$(INSTALL=$INSTALL "$ROOT/scripts/build-pgo.sh" 2> >(tee "$WORK/build-pgo.log" >&2)) &&
        [[ -x $PGO_BIN ]]; then
        SG_BIN=$PGO_BIN
        BUILT=pgo
    else
        warn_loud "scripts/build-pgo.sh failed: EVERY sessiongate row runs the plain release build" \
            "(the report says so; BUILD=release asks for that without trying)"
    fi
fi

# ---------------------------------------------------------------- ports, cert

USED_PORTS=" "
# Outside the kernel's ephemeral range: a port in it can be taken as the source
# port of an outgoing connection (wrk's, a proxy's) between the check and the
# bind, which made a server fail to start now and then. Below the range when
# there is room there, else above it, else anywhere (and the risk stays).
read -r EPH_LOW EPH_HIGH < <(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
if ((EPH_LOW > 12000)); then
    PORT_MIN=10000 PORT_MAX=$((EPH_LOW - 1))
elif ((EPH_HIGH < 63000)); then
    PORT_MIN=$((EPH_HIGH + 1)) PORT_MAX=65535
else
    PORT_MIN=10000 PORT_MAX=65535
fi
free_port() { # VAR: sets VAR to a port of 127.0.0.1 nothing listens on
    local p i
    for ((i = 0; i < 500; i++)); do
        p=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (PORT_MAX - PORT_MIN + 1)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found on 127.0.0.1"
}
free_port P_BACKEND
free_port P_NGINX
free_port P_NGINX_TLS
free_port P_SG
free_port P_SG_TLS
free_port P_NGINX1
free_port P_NGINX_HDR
free_port P_NGINX_LOG
free_port P_NGINX_PIN
free_port P_SG_PIN
free_port P_SG_NOLOG
free_port P_SG_USER
free_port P_SG_UID
free_port P_SG1
free_port P_SG_REL
free_port P_SG_ALT

say "self-signed certificate (openssl) in $WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >"$WORK/openssl.log" 2>&1 ||
    die "openssl could not make a certificate: $(tail -3 "$WORK/openssl.log")"

# ---------------------------------------------------------------- servers

BODY='hello from the backend\n'
NGINX_USER=""
[[ $(id -u) == 0 ]] && NGINX_USER="user root;" # the default user "nobody" may lack a group here

nginx_conf() { # name [worker_processes [main-context directives]], then the http{} body on stdin
    local dir="$WORK/$1" wp=${2:-auto} main=${3:-}
    mkdir -p "$dir/tmp"
    {
        cat <<EOF
$NGINX_USER
worker_processes $wp;
$main
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
EOF
        cat
        echo "}"
    } >"$dir/nginx.conf"
    "$NGINX_BIN" -t -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/test.log" 2>&1 ||
        die "nginx $1 config rejected: $(cat "$dir/test.log")"
}

start() { # name, command...
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    say "started $name (pid $!)"
}

wait_http() { # name url pid
    local i code
    for ((i = 0; i < 100; i++)); do
        code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$2" 2>/dev/null || true)
        [[ $code =~ ^[1-5][0-9][0-9]$ ]] && return 0
        kill -0 "$3" 2>/dev/null || die "$1 exited at start: $(tail -5 "$WORK/$1.err" "$WORK/$1.out" 2>/dev/null)"
        sleep 0.1
    done
    die "$1 did not answer on $2 within 10 s"
}

if ((USE_NGINX)); then
    nginx_conf backend <<EOF
    server {
        # reuseport: the kernel spreads the proxies' upstream connections over
        # the backend's workers. Without it one worker could take most of one
        # proxy's connections for the whole run (seen: 1.55 s against 0.65 s of
        # CPU in 5 s), a spread between runs that no round-robin evens out.
        listen 127.0.0.1:$P_BACKEND reuseport;
        location / { return 200 "$BODY"; }
        location /write {
            add_header X-Session-Update '{"n": \$connection_requests}' always;
            return 200 "$BODY";
        }
        location /login {
            add_header X-Session-Update '{"uid": "alice"}' always;
            return 200 "$BODY";
        }
    }
EOF
    start backend "$NGINX_BIN" -p "$WORK/backend" -e "$WORK/backend/error.log" -c "$WORK/backend/nginx.conf"
    BACKEND_KIND="nginx $("$NGINX_BIN" -v 2>&1 | sed 's/.*nginx\///')"
else
    start backend "$BACKEND_BIN" "127.0.0.1:$P_BACKEND"
    BACKEND_KIND="bundled (examples/bench_backend.rs)"
fi
wait_http backend "http://127.0.0.1:$P_BACKEND/" "${PIDS[-1]}"

# The processes whose CPU time is counted: nginx's workers (children of the
# master started above), or the process itself.
workers_of() { # pid [expected children] -> its child processes, or itself when it has none
    local kids i
    # The first worker may answer before the master has forked the others.
    for ((i = 0; i < 50; i++)); do
        kids=$(pgrep -P "$1" | tr '\n' ' ')
        (($(wc -w <<<"$kids") >= ${2:-0})) && break
        sleep 0.1
    done
    echo "${kids:-$1}"
}
declare -A CPU_PIDS
BACKEND_PIDS=$(workers_of "${PIDS[-1]}" "$( ((USE_NGINX)) && nproc || echo 0)")

# The http{} body of nginx as a plain proxy_pass to the backend over kept-alive
# upstream connections: listening on 127.0.0.1:$1, with server-level
# directives $2 and location-level ones $3 (both optional).
proxy_pass_body() {
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$P_BACKEND;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$1;
${2:-}
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
${3:-}
        }
    }
EOF
}

if ((USE_NGINX)); then
    proxy_pass_body "$P_NGINX" "        listen 127.0.0.1:$P_NGINX_TLS ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;" | nginx_conf proxy
    start nginx-proxy "$NGINX_BIN" -p "$WORK/proxy" -e "$WORK/proxy/error.log" -c "$WORK/proxy/nginx.conf"
    wait_http nginx-proxy "http://127.0.0.1:$P_NGINX/" "${PIDS[-1]}"
    CPU_PIDS[nginx]=$(workers_of "${PIDS[-1]}" "$(nproc)")
    CPU_PIDS[nginx_tls_h1]=${CPU_PIDS[nginx]}
    CPU_PIDS[nginx_tls_h2]=${CPU_PIDS[nginx]}
    # The request headers sessiongate's read path sends for the benchmark
    # session, with values of the same length: the backend parses the same,
    # only the proxy's work differs.
    SG_EXPIRY_DATE=$(date -u -d '+14 days' '+%Y-%m-%dT%H:%M:%SZ')
    proxy_pass_body "$P_NGINX_HDR" "" "            proxy_set_header X-Session '{\"n\":1}';
            proxy_set_header X-Session-Id 0123456789abcdef0123456789abcdef;
            proxy_set_header X-Session-New false;
            proxy_set_header X-Session-Expiry-Age 1209600;
            proxy_set_header X-Session-Expiry-Date $SG_EXPIRY_DATE;
            proxy_set_header X-Session-Expire-At-Browser-Close false;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;" | nginx_conf proxyhdr
    start nginx-proxy-hdr "$NGINX_BIN" -p "$WORK/proxyhdr" -e "$WORK/proxyhdr/error.log" -c "$WORK/proxyhdr/nginx.conf"
    wait_http nginx-proxy-hdr "http://127.0.0.1:$P_NGINX_HDR/" "${PIDS[-1]}"
    CPU_PIDS[nginx_hdr]=$(workers_of "${PIDS[-1]}" "$(nproc)")
    # nginx as it runs out of the box: its default access log (combined, one
    # write(2) to a file per request), beside sessiongate's default (the
    # access log on, to stderr, which this script sends to a file).
    proxy_pass_body "$P_NGINX_LOG" "        access_log $WORK/proxylog/access.log combined;" | nginx_conf proxylog
    start nginx-proxy-log "$NGINX_BIN" -p "$WORK/proxylog" -e "$WORK/proxylog/error.log" -c "$WORK/proxylog/nginx.conf"
    wait_http nginx-proxy-log "http://127.0.0.1:$P_NGINX_LOG/" "${PIDS[-1]}"
    CPU_PIDS[nginx_log]=$(workers_of "${PIDS[-1]}" "$(nproc)")
    if [[ $ONE_WORKER == 1 ]]; then
        proxy_pass_body "$P_NGINX1" | nginx_conf proxy1 1
        start nginx-proxy-1w "$NGINX_BIN" -p "$WORK/proxy1" -e "$WORK/proxy1/error.log" -c "$WORK/proxy1/nginx.conf"
        wait_http nginx-proxy-1w "http://127.0.0.1:$P_NGINX1/" "${PIDS[-1]}"
        CPU_PIDS[nginx_1w]=$(workers_of "${PIDS[-1]}" 1)
    fi
    if [[ $PINNED == 1 ]]; then
        proxy_pass_body "$P_NGINX_PIN" | nginx_conf proxypin auto "worker_cpu_affinity auto;"
        start nginx-proxy-pin "$NGINX_BIN" -p "$WORK/proxypin" -e "$WORK/proxypin/error.log" -c "$WORK/proxypin/nginx.conf"
        wait_http nginx-proxy-pin "http://127.0.0.1:$P_NGINX_PIN/" "${PIDS[-1]}"
        CPU_PIDS[nginx_pin]=$(workers_of "${PIDS[-1]}" "$(nproc)")
    fi
fi

# Every instance has an admin listener (so it keeps metrics, as in
# production) unless a fourth argument replaces the section.
SG_ADMIN=$'[admin]\nlisten = "127.0.0.1:0"'
sg_conf() { # file listen tls-lines [admin-section]
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
$3
shutdown_grace = "1s"

${4-$SG_ADMIN}

[session]
secret_key = "sessiongate-load-benchmark-secret-0123456789"

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
    "$SG_BIN" check --config "$1" >"$1.check" 2>&1 || die "sessiongate check $1: $(cat "$1.check")"
}
sg_conf "$WORK/sg-plain.toml" "$P_SG" 'tls = false'
sg_conf "$WORK/sg-tls.toml" "$P_SG_TLS" "tls = true
cert = \"$WORK/cert.pem\"
key = \"$WORK/key.pem\""
start sessiongate "$SG_BIN" run --config "$WORK/sg-plain.toml"
wait_http sessiongate "http://127.0.0.1:$P_SG/static/" "${PIDS[-1]}"
CPU_PIDS[sg_static]=${PIDS[-1]}
CPU_PIDS[sg_read]=${PIDS[-1]}
CPU_PIDS[sg_write]=${PIDS[-1]}
start sessiongate-tls "$SG_BIN" run --config "$WORK/sg-tls.toml"
wait_http sessiongate-tls "https://127.0.0.1:$P_SG_TLS/static/" "${PIDS[-1]}"
CPU_PIDS[sg_tls_h1]=${PIDS[-1]}
CPU_PIDS[sg_tls_h2]=${PIDS[-1]}
if [[ $BUILT == pgo ]]; then
    sg_conf "$WORK/sg-rel.toml" "$P_SG_REL" 'tls = false'
    start sessiongate-release "$SG_REL_BIN" run --config "$WORK/sg-rel.toml"
    wait_http sessiongate-release "http://127.0.0.1:$P_SG_REL/static/" "${PIDS[-1]}"
    CPU_PIDS[sg_read_rel]=${PIDS[-1]}
fi
if [[ -n ${ALT_BIN:-} ]]; then
    [[ -x $ALT_BIN ]] || die "ALT_BIN=$ALT_BIN is not an executable"
    sg_conf "$WORK/sg-alt.toml" "$P_SG_ALT" 'tls = false'
    start sessiongate-alt "$ALT_BIN" run --config "$WORK/sg-alt.toml"
    wait_http sessiongate-alt "http://127.0.0.1:$P_SG_ALT/static/" "${PIDS[-1]}"
    CPU_PIDS[sg_read_alt]=${PIDS[-1]}
fi
if [[ $ONE_WORKER == 1 ]]; then
    sg_conf "$WORK/sg-1w.toml" "$P_SG1" 'tls = false'
    start sessiongate-1w env SESSIONGATE_WORKERS=1 "$SG_BIN" run --config "$WORK/sg-1w.toml"
    wait_http sessiongate-1w "http://127.0.0.1:$P_SG1/static/" "${PIDS[-1]}"
    CPU_PIDS[sg_read_1w]=${PIDS[-1]}
fi
if [[ $PINNED == 1 ]]; then
    sg_conf "$WORK/sg-pin.toml" "$P_SG_PIN" 'tls = false'
    start sessiongate-pin env SESSIONGATE_CPU_AFFINITY=auto "$SG_BIN" run --config "$WORK/sg-pin.toml"
    wait_http sessiongate-pin "http://127.0.0.1:$P_SG_PIN/static/" "${PIDS[-1]}"
    CPU_PIDS[sg_read_pin]=${PIDS[-1]}
fi

# The read path with the access log off and no [admin] section (so no
# metrics are kept), beside the default (the log on, to a file here: the
# process's stderr; metrics kept for the admin listener every other instance
# has): what both cost (issue 16: at most 3 %).
sg_conf "$WORK/sg-nolog.toml" "$P_SG_NOLOG" 'tls = false
access_log = "off"' ''
start sessiongate-nolog "$SG_BIN" run --config "$WORK/sg-nolog.toml"
wait_http sessiongate-nolog "http://127.0.0.1:$P_SG_NOLOG/static/" "${PIDS[-1]}"
CPU_PIDS[sg_read_nolog]=${PIDS[-1]}

# `[session] user_key` set (issue 18: the write path keeps at least 0.9x):
# user_key = "n", the key the backend's /write sets, so every write names a
# user: a request without a cookie is a login (a new session in its user's
# index) and a write with one moves the session to another user's index (the
# counter changes), the costliest update.
sg_conf "$WORK/sg-user.toml" "$P_SG_USER" 'tls = false'
sed -i 's/^\[session\]$/[session]\nuser_key = "n"/' "$WORK/sg-user.toml"
"$SG_BIN" check --config "$WORK/sg-user.toml" >"$WORK/sg-user.toml.check" 2>&1 ||
    die "sessiongate check sg-user.toml: $(cat "$WORK/sg-user.toml.check")"
start sessiongate-user "$SG_BIN" run --config "$WORK/sg-user.toml"
wait_http sessiongate-user "http://127.0.0.1:$P_SG_USER/static/" "${PIDS[-1]}"
CPU_PIDS[sg_login]=${CPU_PIDS[sg_read]}
CPU_PIDS[sg_login_user]=${PIDS[-1]}
CPU_PIDS[sg_write_user]=${PIDS[-1]}
# user_key = "uid", set once by the backend's /login: the writes to /write
# change `n` and leave the user as it is, as most writes of a logged-in
# session do (the index is not touched).
sg_conf "$WORK/sg-uid.toml" "$P_SG_UID" 'tls = false'
sed -i 's/^\[session\]$/[session]\nuser_key = "uid"/' "$WORK/sg-uid.toml"
start sessiongate-uid "$SG_BIN" run --config "$WORK/sg-uid.toml"
wait_http sessiongate-uid "http://127.0.0.1:$P_SG_UID/static/" "${PIDS[-1]}"
CPU_PIDS[sg_write_uid]=${PIDS[-1]}

# ---------------------------------------------------------------- a live session

session_cookie() { # base-url -> "sessionid=KEY"
    local base=$1 c1 c2 h
    c1=$(curl -sk -D - -o /dev/null --max-time 5 "$base/write" |
        tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1)
    [[ -n $c1 ]] || die "no session cookie from $base/write"
    # The cookie must name a live session: a write with it keeps the key...
    c2=$(curl -sk -D - -o /dev/null --max-time 5 -H "Cookie: $c1" "$base/write" |
        tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1)
    [[ $c2 == "$c1" ]] || die "the session from $base was not kept (got a new key)"
    # ...and a read with it answers 200 without writing.
    h=$(curl -sk -D - -o /dev/null --max-time 5 -H "Cookie: $c1" "$base/" | tr -d '\r')
    [[ $h == *" 200"* ]] || die "read path of $base did not answer 200"
    [[ $h != *[Ss]et-[Cc]ookie* ]] || die "read path of $base wrote the session"
    echo "$c1"
}
COOKIE=$(session_cookie "http://127.0.0.1:$P_SG")
COOKIE_TLS=$(session_cookie "https://127.0.0.1:$P_SG_TLS")
COOKIE_REL=""
[[ $BUILT == pgo ]] && COOKIE_REL=$(session_cookie "http://127.0.0.1:$P_SG_REL")
COOKIE_ALT=""
[[ -n ${ALT_BIN:-} ]] && COOKIE_ALT=$(session_cookie "http://127.0.0.1:$P_SG_ALT")
COOKIE_1W=""
[[ $ONE_WORKER == 1 ]] && COOKIE_1W=$(session_cookie "http://127.0.0.1:$P_SG1")
COOKIE_PIN=""
[[ $PINNED == 1 ]] && COOKIE_PIN=$(session_cookie "http://127.0.0.1:$P_SG_PIN")
COOKIE_NOLOG=$(session_cookie "http://127.0.0.1:$P_SG_NOLOG")
COOKIE_USER=$(session_cookie "http://127.0.0.1:$P_SG_USER")
COOKIE_UID=$(session_cookie "http://127.0.0.1:$P_SG_UID")
curl -s -o /dev/null --max-time 5 -H "Cookie: $COOKIE_UID" "http://127.0.0.1:$P_SG_UID/login" ||
    die "no login on sessiongate-uid"
say "live sessions: plain ${COOKIE:0:14}..., TLS ${COOKIE_TLS:0:14}..."

# ---------------------------------------------------------------- scenarios

# id | label | tool | url | cookie
# The rows a goal compares run back to back (nginx then the read path, each
# TLS pair), so that their per-round ratio sees the same machine; the read
# path on the plain release build follows the PGO one.
SCEN=()
SCEN+=("backend|backend directly|wrk|http://127.0.0.1:$P_BACKEND/|")
if ((USE_NGINX)); then
    SCEN+=("nginx|nginx proxy_pass (keepalive)|wrk|http://127.0.0.1:$P_NGINX/|")
fi
SCEN+=("sg_read|sessiongate live session (read)|wrk|http://127.0.0.1:$P_SG/|$COOKIE")
if [[ -n ${ALT_BIN:-} ]]; then
    SCEN+=("sg_read_alt|sessiongate live session (read), ALT_BIN \`$(basename "$(dirname "$(dirname "$ALT_BIN")")")/$(basename "$(dirname "$ALT_BIN")")/$(basename "$ALT_BIN")\`|wrk|http://127.0.0.1:$P_SG_ALT/|$COOKIE_ALT")
fi
if ((USE_NGINX)); then
    SCEN+=("nginx_log|nginx proxy_pass, its default access log (combined, to a file)|wrk|http://127.0.0.1:$P_NGINX_LOG/|")
fi
SCEN+=("sg_read_nolog|sessiongate live session (read), access_log = \"off\", no [admin] (no metrics)|wrk|http://127.0.0.1:$P_SG_NOLOG/|$COOKIE_NOLOG")
if [[ $BUILT == pgo ]]; then
    SCEN+=("sg_read_rel|sessiongate live session (read), plain \`cargo build --release\`|wrk|http://127.0.0.1:$P_SG_REL/|$COOKIE_REL")
fi
if ((USE_NGINX)); then
    SCEN+=("nginx_hdr|nginx proxy_pass + sessiongate's 9 request headers|wrk|http://127.0.0.1:$P_NGINX_HDR/|")
fi
SCEN+=("sg_static|sessiongate session=false route|wrk|http://127.0.0.1:$P_SG/static/|")
SCEN+=("sg_write|sessiongate write every request|wrk|http://127.0.0.1:$P_SG/write|$COOKIE")
SCEN+=("sg_write_user|sessiongate write every request, user_key set (the user changes on most writes)|wrk|http://127.0.0.1:$P_SG_USER/write|$COOKIE_USER")
SCEN+=("sg_write_uid|sessiongate write every request, user_key set (a logged-in session; the user stays)|wrk|http://127.0.0.1:$P_SG_UID/write|$COOKIE_UID")
SCEN+=("sg_login|sessiongate new session every request (no cookie)|wrk|http://127.0.0.1:$P_SG/write|")
SCEN+=("sg_login_user|sessiongate login every request (no cookie; a new session naming its user), user_key set|wrk|http://127.0.0.1:$P_SG_USER/write|")
if ((USE_NGINX)); then
    SCEN+=("nginx_tls_h1|nginx proxy TLS HTTP/1.1|wrk|https://127.0.0.1:$P_NGINX_TLS/|")
fi
SCEN+=("sg_tls_h1|sessiongate TLS HTTP/1.1 (read)|wrk|https://127.0.0.1:$P_SG_TLS/|$COOKIE_TLS")
if ((HAVE_H2LOAD)); then
    if ((USE_NGINX)); then
        SCEN+=("nginx_tls_h2|nginx proxy TLS h2|h2load|https://127.0.0.1:$P_NGINX_TLS/|")
    fi
    SCEN+=("sg_tls_h2|sessiongate TLS h2 (read)|h2load|https://127.0.0.1:$P_SG_TLS/|$COOKIE_TLS")
fi
if [[ $ONE_WORKER == 1 ]]; then
    if ((USE_NGINX)); then
        SCEN+=("nginx_1w|nginx proxy_pass, worker_processes 1|wrk|http://127.0.0.1:$P_NGINX1/|")
    fi
    SCEN+=("sg_read_1w|sessiongate live session (read), 1 worker|wrk|http://127.0.0.1:$P_SG1/|$COOKIE_1W")
fi
if [[ $PINNED == 1 ]]; then
    if ((USE_NGINX)); then
        SCEN+=("nginx_pin|nginx proxy_pass, worker_cpu_affinity auto|wrk|http://127.0.0.1:$P_NGINX_PIN/|")
    fi
    SCEN+=("sg_read_pin|sessiongate live session (read), SESSIONGATE_CPU_AFFINITY=auto|wrk|http://127.0.0.1:$P_SG_PIN/|$COOKIE_PIN")
fi

if [[ -n $ONLY ]]; then
    picked=()
    for s in "${SCEN[@]}"; do
        [[ " $ONLY " == *" ${s%%|*} "* ]] && picked+=("$s")
    done
    for id in $ONLY; do
        found=0
        for s in "${SCEN[@]}"; do [[ ${s%%|*} == "$id" ]] && found=1; done
        ((found)) || warn_loud "ONLY: no scenario \"$id\" here (a typo, or its tool or option is off): skipped"
    done
    ((${#picked[@]})) || die "ONLY=$ONLY: none of these scenarios is available here"
    SCEN=("${picked[@]}")
fi

for s in "${SCEN[@]}"; do
    IFS='|' read -r id _ _ url cookie <<<"$s"
    code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 ${cookie:+-H "Cookie: $cookie"} "$url" || true)
    [[ $code == 200 ]] || die "scenario $id: $url answered $code"
done

to_ms() { # wrk's "812.00us" / "1.23ms" / "1.02s" / "1.50m"
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n = n / 1000
        else if (v ~ /ms$/) n = n
        else if (v ~ /m$/) n = n * 60000
        else if (v ~ /s$/) n = n * 1000
        printf "%.3f", n
    }'
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # pids... -> user + system clock ticks of those processes, all threads
    local p v t=0
    for p in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
per_request() { # ticks requests -> microseconds of CPU per request, or -1
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print -1 }'
}

# run_one id tool url cookie seconds raw-file
#   -> "rps p50 p99 errors proxy-cpu backend-cpu" on stdout (CPU: µs per
#      request of the scenario's proxy processes and of the backend's; -1 when
#      there is no proxy)
run_one() {
    local id=$1 tool=$2 url=$3 cookie=$4 secs=$5 raw=$6
    local proxy_pids=${CPU_PIDS[$id]:-} p0 b0 p1 b1 done_n
    # shellcheck disable=SC2086 # pid lists
    p0=$(cpu_ticks $proxy_pids) b0=$(cpu_ticks $BACKEND_PIDS)
    if [[ $tool == wrk ]]; then
        timeout $((secs + 60)) wrk -t "$THREADS" -c "$CONNECTIONS" -d "${secs}s" --latency --timeout 10s \
            ${cookie:+-H "Cookie: $cookie"} "$url" >"$raw" 2>&1 || true
        # shellcheck disable=SC2086
        p1=$(cpu_ticks $proxy_pids) b1=$(cpu_ticks $BACKEND_PIDS)
        done_n=$(awk '/ requests in / {print $1}' "$raw")
        local rps p50 p99 non2xx sock
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$raw")
        p50=$(awk '$1 == "50%" {print $2}' "$raw")
        p99=$(awk '$1 == "99%" {print $2}' "$raw")
        non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")
        sock=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$raw")
        [[ -n $rps && -n $p50 && -n $p99 ]] || {
            say "wrk gave no result for $id:"
            cat "$raw" >&2
            echo "0 0 0 1 -1 -1"
            return
        }
        echo "$rps $(to_ms "$p50") $(to_ms "$p99") $((${non2xx:-0} + ${sock:-0})) $(cpu_of "$proxy_pids")"
    else
        local log="$raw.log"
        timeout $((secs + 60)) h2load -c "$CONNECTIONS" -t "$THREADS" -m 1 -D "$secs" \
            ${cookie:+-H "cookie: $cookie"} --log-file="$log" "$url" >"$raw" 2>&1 || true
        # shellcheck disable=SC2086
        p1=$(cpu_ticks $proxy_pids) b1=$(cpu_ticks $BACKEND_PIDS)
        done_n=$(awk '/^requests:/ {print $6}' "$raw")
        local rps errs pcts
        rps=$(awk '/^finished in/ {gsub(",", ""); print $4}' "$raw")
        errs=$(awk '/^requests:/ {print $10 + $12 + $14} /^status codes:/ {gsub(",", ""); print $5 + $7 + $9}' "$raw" |
            awk '{s += $1} END {print s + 0}')
        [[ -n $rps && -s $log ]] || {
            say "h2load gave no result for $id:"
            cat "$raw" >&2
            echo "0 0 0 1 -1 -1"
            return
        }
        pcts=$(cut -f3 "$log" | sort -n | awk '{v[NR] = $1} END {
            i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; if (i50 < 1) i50 = 1
            i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++; if (i99 < 1) i99 = 1
            printf "%.3f %.3f", v[i50] / 1000, v[i99] / 1000 }')
        rm -f "$log"
        echo "$rps $pcts $errs $(cpu_of "$proxy_pids")"
    fi
}
cpu_of() { # proxy-pids (uses p0 p1 b0 b1 done_n of run_one) -> "proxy-cpu backend-cpu"
    if [[ -n $1 ]]; then
        echo "$(per_request $((p1 - p0)) "${done_n:-0}") $(per_request $((b1 - b0)) "${done_n:-0}")"
    else
        echo "-1 $(per_request $((b1 - b0)) "${done_n:-0}")"
    fi
}

mkdir -p "$WORK/raw"
n=${#SCEN[@]}
total=$(((n * ROUNDS * DURATION) + (WARMUP > 0 ? n * WARMUP : 0)))
say "$n scenarios x $ROUNDS rounds x ${DURATION}s at $CONNECTIONS connections (about ${total}s)"
if ((WARMUP > 0)); then
    for s in "${SCEN[@]}"; do
        IFS='|' read -r id _ tool url cookie <<<"$s"
        run_one "$id" "$tool" "$url" "$cookie" "$WARMUP" "$WORK/raw/$id.warmup" >/dev/null
    done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    # Every other round runs the rows in reverse, so that neither row of a
    # pair always comes first.
    order=("${SCEN[@]}")
    if ((r % 2 == 0)); then
        order=()
        for ((i = ${#SCEN[@]} - 1; i >= 0; i--)); do order+=("${SCEN[i]}"); done
    fi
    for s in "${order[@]}"; do
        IFS='|' read -r id label tool url cookie <<<"$s"
        res=$(run_one "$id" "$tool" "$url" "$cookie" "$DURATION" "$WORK/raw/$id.$r")
        echo "$res" >"$WORK/raw/$id.$r.res"
        say "round $r/$ROUNDS  $(printf '%-36s' "$label") $(awk '{printf "%10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  errors %s  CPU/req proxy %s backend %s us", $1, $2, $3, $4, ($5 < 0 ? "-" : $5), $6}' <<<"$res")"
    done
done

median() { # values...
    printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {
        if (NR == 0) { print 0; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A RPS P50 P99 ERR ALL PCPU BCPU
for s in "${SCEN[@]}"; do
    IFS='|' read -r id _ _ _ _ <<<"$s"
    rps=() p50=() p99=() pcpu=() bcpu=() errs=0 all=""
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b c d e f <"$WORK/raw/$id.$r.res"
        rps+=("$a") p50+=("$b") p99+=("$c") pcpu+=("${e:--1}") bcpu+=("${f:--1}")
        errs=$((errs + d))
        all+="${all:+ / }$(printf '%.0f' "$a")"
    done
    RPS[$id]=$(median "${rps[@]}")
    P50[$id]=$(median "${p50[@]}")
    P99[$id]=$(median "${p99[@]}")
    ERR[$id]=$errs
    ALL[$id]=$all
    PCPU[$id]=$(median "${pcpu[@]}")
    BCPU[$id]=$(median "${bcpu[@]}")
done

# ---------------------------------------------------------------- memory

MEM_OUT=""
if [[ $MEM == 1 ]]; then
    say "memory per session: $MEM_SESSIONS sessions in the memory store"
    MEM_OUT=$("$MEM_BIN" "$MEM_SESSIONS" 2>&1) || die "mem_per_session failed: $MEM_OUT"
fi

# ---------------------------------------------------------------- report

per_round() { # a b -> a/b of each round (a round whose b served nothing is left out, loudly)
    local r a b
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a _ <"$WORK/raw/$1.$r.res"
        read -r b _ <"$WORK/raw/$2.$r.res"
        if awk -v b="$b" 'BEGIN { exit !(b > 0) }'; then
            awk -v a="$a" -v b="$b" 'BEGIN { printf "%.6f\n", a / b }'
        else
            say "WARNING: round $r of $2 served no requests: $1 / $2 is over the other rounds"
        fi
    done
}
ratio() { # a b -> median of the per-round ratios a/b, unrounded, or n/a
    [[ -n ${RPS[$1]:-} && -n ${RPS[$2]:-} ]] || {
        echo "n/a"
        return
    }
    local v
    mapfile -t v < <(per_round "$1" "$2")
    ((${#v[@]})) || {
        echo "n/a"
        return
    }
    # Six decimals, not awk's six significant digits: 0.9999995 is not 1.
    printf '%s\n' "${v[@]}" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) printf "%.6f", v[(NR + 1) / 2]; else printf "%.6f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
spread() { # a b -> lowest-highest per-round ratio, or empty
    [[ -n ${RPS[$1]:-} && -n ${RPS[$2]:-} ]] || return 0
    per_round "$1" "$2" 2>/dev/null | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%.3f-%.3f", lo, hi }'
}
goal() { # value min -> met / NOT met
    awk -v v="$1" -v m="$2" 'BEGIN { if (v == "n/a") print "n/a"; else if (v + 0 >= m) print "met"; else print "**NOT met**" }'
}
row() { # label a b [goal minimum]: one line of the ratio table
    local v shown
    v=$(ratio "$2" "$3")
    shown=$v
    [[ $v == n/a ]] || shown=$(awk -v v="$v" 'BEGIN { printf "%.3f", v }')
    # The goal is judged on the unrounded median: 0.996 is not 1.0.
    echo "| $1 | $shown | $(spread "$2" "$3") | ${4:+>= $4: $(goal "$v" "$4")} |"
}

build_note() { # how the sessiongate rows were built
    case $BUILD/$BUILT in
    pgo/pgo) echo "profile-guided build of \`scripts/build-pgo.sh\` (the build to deploy; its training mix is in the script), and one read-path row on the plain \`cargo build --release\` binary" ;;
    pgo/release) echo "**plain \`cargo build --release\`: \`scripts/build-pgo.sh\` failed, so no row runs the profile-guided build**" ;;
    *) echo "plain \`cargo build --release\` (\`BUILD=release\`)" ;;
    esac
}
REPORT="$WORK/report.md"
{
    echo "<!-- BEGIN load.sh: generated by benches/load.sh; edits between these markers are overwritten -->"
    echo "## Load benchmark (generated)"
    echo
    echo "- Command: \`$COMMAND\` (run from the repository root)"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- Machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) memory, Linux $(uname -r)"
    echo "- sessiongate: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -z $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]] || echo ' + uncommitted changes in src/'), $(build_note), memory store, one process per kind of row (plain HTTP, TLS, one worker, pinned workers$([[ $BUILT == pgo ]] && echo ', plain release build')), one worker thread per core unless a row says otherwise"
    echo "- Backend: $BACKEND_KIND on 127.0.0.1, body \`hello from the backend\` (23 bytes); \`/write\` adds \`X-Session-Update: {\"n\": <counter>}\`"
    if ((USE_NGINX)); then
        echo "- nginx: $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')$( ((NGINX_INSTALLED_BY_SCRIPT)) && echo ' (installed by this run of the script)'), \`worker_processes auto\`, \`access_log off\`, proxy: \`proxy_pass\` to an upstream with \`keepalive 64\`, \`proxy_http_version 1.1\`, \`proxy_set_header Connection \"\"\`"
    elif [[ $BACKEND == bundled ]]; then
        echo "- nginx: not used (\`BACKEND=bundled\`): **the nginx rows are skipped**"
    else
        echo "- nginx: **not available: the nginx rows are skipped** (bundled backend used)"
    fi
    echo "- Load: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $( ((HAVE_H2LOAD)) && h2load --version 2>&1 | head -1 || echo 'h2load: not available, h2 rows skipped'); $CONNECTIONS connections, $THREADS threads, h2load \`-m 1\` (one stream per connection); TLS: $(openssl version | awk '{print $1, $2}') self-signed P-256 certificate"
    echo "- Method: the scenarios run round-robin, $ROUNDS rounds of ${DURATION} s each$( ((WARMUP > 0)) && echo " after a ${WARMUP} s warm-up of each"); the table shows the median of the rounds for each column, and a req/s ratio is the median over the rounds of the two rows' ratio within each round, with the lowest and the highest round beside it (the rows a goal compares run back to back, and every other round runs the rows in reverse order, so a slow phase of the machine touches both rows of a pair); p50/p99 come from wrk \`--latency\` and from h2load's per-request log. The load generator, the backend and the proxies share the same $(nproc) cores."
    echo
    echo "| scenario | tool | req/s (median) | p50 ms | p99 ms | errors | proxy CPU µs/req | backend CPU µs/req | req/s per round |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for s in "${SCEN[@]}"; do
        IFS='|' read -r id label tool _ _ <<<"$s"
        pc=${PCPU[$id]} bc=${BCPU[$id]}
        awk -v v="$pc" 'BEGIN { exit !(v < 0) }' && pc="-"
        awk -v v="$bc" 'BEGIN { exit !(v < 0) }' && bc="-"
        printf '| %s | %s | %.0f | %.3f | %.3f | %s | %s | %s | %s |\n' "$label" "$tool" "${RPS[$id]}" "${P50[$id]}" "${P99[$id]}" "${ERR[$id]}" "$pc" "$bc" "${ALL[$id]}"
    done
    echo
    echo "CPU columns: user + system time of the proxy's processes (nginx's workers, or the sessiongate process with all its threads) and of the backend's, from \`/proc/<pid>/stat\` around each run, divided by the requests it completed (median of the rounds). The load generator's share is not shown; with everything on $(nproc) cores, requests/s follows the sum."
    echo
    echo "| ratio (req/s) | median of the per-round ratios | lowest-highest round | goal (issue 5) |"
    echo "| --- | ---: | ---: | --- |"
    row "sessiongate read path / nginx plain proxy (plain HTTP)" sg_read nginx 1.0
    row "sessiongate TLS HTTP/1.1 read / nginx plain proxy (plain HTTP)" sg_tls_h1 nginx 1.0
    row "sessiongate TLS h2 read / nginx plain proxy (plain HTTP)" sg_tls_h2 nginx 1.0
    row "sessiongate TLS HTTP/1.1 read / nginx TLS HTTP/1.1 proxy" sg_tls_h1 nginx_tls_h1 1.0
    row "sessiongate TLS h2 read / nginx TLS h2 proxy" sg_tls_h2 nginx_tls_h2 1.0
    row "sessiongate write / read" sg_write sg_read 0.9
    row "sessiongate read, access log and metrics on (the defaults) / both off" sg_read sg_read_nolog 0.97
    row "sessiongate write, user_key set (the user changes on most writes) / unset" sg_write_user sg_write 0.9
    row "sessiongate write, user_key set (a logged-in session, the user unchanged) / unset" sg_write_uid sg_write 0.9
    row "sessiongate login (a new session every request), user_key set / unset" sg_login_user sg_login 0.9
    row "sessiongate read / nginx proxy sending the same 9 request headers (like for like)" sg_read nginx_hdr
    row "sessiongate read / nginx proxy_pass with its default access log (each with its default log on)" sg_read nginx_log
    row "nginx with its default access log / nginx plain proxy (access_log off)" nginx_log nginx
    row "nginx with the 9 headers / nginx plain proxy (what the headers cost, both sides)" nginx_hdr nginx
    row "sessiongate TLS HTTP/1.1 / plain (read)" sg_tls_h1 sg_read
    row "sessiongate TLS h2 / plain HTTP/1.1 (read)" sg_tls_h2 sg_read
    row "sessiongate session=false / nginx plain proxy" sg_static nginx
    row "sessiongate read / session=false (cost of the session)" sg_read sg_static
    row "nginx plain proxy / backend directly" nginx backend
    if [[ -n ${ALT_BIN:-} ]]; then
        row "sessiongate read, ALT_BIN / this build" sg_read_alt sg_read
        row "sessiongate read, ALT_BIN / nginx plain proxy" sg_read_alt nginx
    fi
    if [[ $BUILT == pgo ]]; then
        row "sessiongate read, PGO build / plain release build" sg_read sg_read_rel
        row "sessiongate read, plain release build / nginx plain proxy" sg_read_rel nginx
    fi
    if [[ $ONE_WORKER == 1 ]]; then
        row "sessiongate read, 1 worker / nginx plain proxy, 1 worker" sg_read_1w nginx_1w
        row "sessiongate read, 1 worker / nginx plain proxy (auto)" sg_read_1w nginx
    fi
    if [[ $PINNED == 1 ]]; then
        row "sessiongate read, workers pinned / nginx, workers pinned" sg_read_pin nginx_pin
        row "sessiongate read, workers pinned / nginx plain proxy" sg_read_pin nginx
    fi
    echo
    cpu_ratio() { # table id id -> a/b of PCPU or BCPU, or n/a
        local -n t=$1
        awk -v a="${t[$2]:--1}" -v b="${t[$3]:--1}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "n/a" }'
    }
    echo "| CPU per request (median) | ratio |"
    echo "| --- | ---: |"
    echo "| proxy: sessiongate read / nginx plain proxy | $(cpu_ratio PCPU sg_read nginx) |"
    echo "| proxy: sessiongate read / nginx with the 9 headers | $(cpu_ratio PCPU sg_read nginx_hdr) |"
    echo "| backend: behind sessiongate read / behind nginx plain proxy | $(cpu_ratio BCPU sg_read nginx) |"
    echo "| backend: behind nginx with the 9 headers / behind nginx plain proxy | $(cpu_ratio BCPU nginx_hdr nginx) |"
    echo
    worst="" checked=""
    for id in sg_static sg_read sg_write sg_tls_h1 sg_tls_h2 sg_read_1w; do
        [[ -n ${P99[$id]:-} ]] || continue
        checked+="${checked:+, }$id"
        awk -v v="${P99[$id]}" 'BEGIN { exit !(v >= 2.0) }' && worst+="${worst:+, }$id (${P99[$id]} ms)"
    done
    if [[ -z $checked ]]; then
        echo "p99 under 2 ms at $CONNECTIONS connections (goal): no sessiongate row with the default (unpinned) workers was measured."
    elif [[ -z $worst ]]; then
        echo "p99 under 2 ms at $CONNECTIONS connections (goal): met on the sessiongate rows measured with the default (unpinned) workers ($checked)."
    else
        echo "p99 under 2 ms at $CONNECTIONS connections (goal): **NOT met** on $worst, of the sessiongate rows measured with the default (unpinned) workers ($checked)."
    fi
    if [[ -n ${P99[sg_read_pin]:-} ]]; then
        echo
        echo "With each worker pinned to a CPU of its own (\`SESSIONGATE_CPU_AFFINITY=auto\`), the read path's p99 was ${P99[sg_read_pin]} ms: $(awk -v v="${P99[sg_read_pin]}" 'BEGIN { print (v < 2.0) ? "under 2 ms" : "**not** under 2 ms" }')$([[ -n ${P99[nginx_pin]:-} ]] && echo "; nginx with \`worker_cpu_affinity auto\`: ${P99[nginx_pin]} ms")."
    fi
    if [[ -n $MEM_OUT ]]; then
        echo
        echo "### Memory per stored session (\`examples/mem_per_session.rs\`, $MEM_SESSIONS sessions)"
        echo
        echo '```'
        echo "$MEM_OUT"
        echo '```'
        extra=$(awk -F: '/minus payload and 32-byte key/ {gsub(/ /, "", $2); print $2}' <<<"$MEM_OUT")
        over=$(awk -F: '/bytes\/session, minus payload:/ {gsub(/ /, "", $2); print $2}' <<<"$MEM_OUT")
        echo
        echo "Overhead beyond the data: $over bytes/session counting the key as overhead, $extra without it; goal (issue 5): at most 300: $(awk -v v="$over" 'BEGIN { print (v <= 300) ? "met" : "**NOT met**" }')."
    fi
    echo "<!-- END load.sh -->"
} >"$REPORT"

echo
cat "$REPORT"
echo

if [[ $OUT != "-" ]]; then
    if [[ -f $OUT ]] && grep -q '^<!-- BEGIN load.sh' "$OUT" && grep -q '^<!-- END load.sh' "$OUT"; then
        awk -v report="$REPORT" '
            /^<!-- BEGIN load.sh/ { while ((getline line < report) > 0) print line; skip = 1; next }
            /^<!-- END load.sh/ { skip = 0; next }
            !skip { print }' "$OUT" >"$WORK/out.md"
        cat "$WORK/out.md" >"$OUT"
    elif [[ -f $OUT ]]; then
        {
            echo
            cat "$REPORT"
        } >>"$OUT"
    else
        {
            echo "# Benchmarks"
            echo
            cat "$REPORT"
        } >"$OUT"
    fi
    say "wrote $OUT"
fi
