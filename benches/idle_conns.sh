#!/usr/bin/env bash
# Memory of idle keep-alive connections, and whether it comes back after a
# burst. Loopback only, bounded (a few seconds a round):
#
#     benches/idle_conns.sh
#
# Starts sessiongate (BIN, default target/release/sessiongate; plain HTTP and
# TLS with a throwaway self-signed certificate; the requests match no route,
# so no upstream is needed and the answer is sessiongate's own 404), then for
# each listener and each of ROUNDS bursts: opens CONNS connections, sends one
# keep-alive request on each and reads the answer, leaves them idle, reads the
# proxy's resident memory (VmRSS), closes them, waits SETTLE seconds and reads
# it again. Prints per-connection cost ((RSS idle - RSS before) / CONNS) and
# RSS before, during and after each burst.
#
# Environment: BIN, CONNS=10000, ROUNDS=3, SETTLE=3, WORKERS=2,
# LISTENERS="plain tls" (either or both). The proxy inherits the environment,
# so allocator settings can be compared the way a systemd unit would set
# them: MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072 benches/idle_conns.sh
set -euo pipefail

BIN=${BIN:-target/release/sessiongate}
CONNS=${CONNS:-10000}
ROUNDS=${ROUNDS:-3}
SETTLE=${SETTLE:-3}
WORKERS=${WORKERS:-2}
LISTENERS=${LISTENERS:-plain tls}

[ -x "$BIN" ] || { echo "no $BIN: build it (cargo build --release) or set BIN" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
command -v openssl >/dev/null || { echo "needs openssl" >&2; exit 1; }
# Client and server each need a descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CONNS + 100)) ]; then
    echo "open files limit $(ulimit -n) is below CONNS=$CONNS" >&2
    exit 1
fi

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" >/dev/null 2>&1

start() { # name tls port
    cat >"$dir/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$3"
tls = $2
cert = "cert.pem"
key = "key.pem"
max_connections = $((CONNS + 100))
# Longer than a burst takes to open (TLS handshakes on a busy machine, a
# debug build): connections closed for idleness would not be measured.
keepalive_timeout = "600s"

[session]
secret_key = "idle-conns-bench-secret-0123456789abcdef"
cookie_secure = false

[store]
clear_expired_interval = "0s"

[[route]]
host = "no-such-host.invalid"
upstream = "http://127.0.0.1:9"
EOF
    SESSIONGATE_WORKERS=$WORKERS RUST_LOG=warn "$BIN" run --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
    pids+=($!)
    started=$!
}

plain_port=$(free_port)
tls_port=$(free_port)
start plain false "$plain_port"
plain_pid=$started
start tls true "$tls_port"
tls_pid=$started
for p in "$plain_port" "$tls_port"; do
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$p)).close()" 2>/dev/null && break
        sleep 0.1
    done
done

cat >"$dir/burst.py" <<'EOF'
import socket, ssl, sys, time
port, tls, conns, pid, settle = int(sys.argv[1]), sys.argv[2] == "true", int(sys.argv[3]), sys.argv[4], float(sys.argv[5])

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
ctx = None
if tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
before = rss()
socks = []
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
for i in range(conns):
    s = socket.create_connection(("127.0.0.1", port))
    if ctx:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(req)
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("closed early")
        got += chunk
    socks.append(s)
time.sleep(0.5)
idle = rss()
for s in socks:
    s.close()
time.sleep(settle)
after = rss()
print(f"{before} {idle} {after}")
EOF

printf '%-6s %-5s %12s %12s %12s %14s\n' listener round "RSS before" "RSS idle" "RSS after" "bytes/conn"
for name in $LISTENERS; do
    if [ $name = plain ]; then port=$plain_port pid=$plain_pid tls=false; else port=$tls_port pid=$tls_pid tls=true; fi
    for r in $(seq "$ROUNDS"); do
        read -r before idle after < <(python3 "$dir/burst.py" "$port" "$tls" "$CONNS" "$pid" "$SETTLE")
        printf '%-6s %-5s %10.1fMB %10.1fMB %10.1fMB %14d\n' $name "$r" \
            "$(echo "$before/1048576" | bc -l)" "$(echo "$idle/1048576" | bc -l)" \
            "$(echo "$after/1048576" | bc -l)" $(((idle - before) / CONNS))
    done
done
echo "($CONNS connections a burst, $WORKERS workers, $BIN, $(date -u +%F), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
