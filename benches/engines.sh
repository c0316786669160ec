#!/usr/bin/env bash
# Session-engine benchmark (issues 17 and 20): the read path and the write path
# through sessiongate on each store engine, in one run with interleaved rounds.
#
#     benches/engines.sh
#
# Everything runs on 127.0.0.1 (ports chosen free) from this one shell, in the
# foreground (no daemons: Linux autogroups would otherwise share the CPU per
# session, see BENCHMARKS.md), and is stopped at exit. Rows:
#   memory     the baseline
#   redis      one redis-server
#   cached_redis  the same redis-server (database 2), each instance's copies
#              version-checked on every load
#   cluster    redis through redis+cluster:// on three primaries (redis-cli --cluster create)
#   sqlite     db on SQLite (a file in the temporary directory)
#   postgres   db on PostgreSQL 15 (initdb in the temporary directory, run as the
#              postgres user when this runs as root; synchronous_commit on, the default)
#   cached_db  PostgreSQL + Redis (the same servers, Redis database 1)
# Each engine gets a read row (GET / with a live session: the upstream sends no
# X-Session-Update) and a write row (GET /write: the upstream, nginx, answers with
# X-Session-Update on every request, so every request is an acknowledged store
# write). Both rows rotate over SESSIONS live session cookies (a wrk Lua script),
# so the writers do not all queue on one row or key.
#
# Every round runs every row once, DURATION seconds each; every other round runs
# them in reverse order. Reported: the median requests/s (2xx only) of each row,
# and the median of the per-round ratios against the goals' baselines.
#
# Environment (all optional):
#   DURATION=5 ROUNDS=3 CONNECTIONS=64 THREADS=2 SESSIONS=64 WARMUP=1
#   ONLY=""   engines to run (space-separated, from the list above; memory and
#             redis are always kept as the baselines)
#   SG_BIN    the sessiongate binary (default target/release/sessiongate, built
#             with `cargo build --release --bin sessiongate` when missing)
#   KEEP=0    1: keep the temporary directory
#   BASE_BIN  a second sessiongate binary (say, a build of main) to compare
#             against in the same run: each engine in BASE_ENGINES also gets
#             rows ENGINE@base served by it, interleaved with the others, and
#             the report adds the per-round ratios of ENGINE to ENGINE@base
#   BASE_ENGINES="postgres cluster"
# Needs: wrk, curl, nginx (the upstream, as in load.sh), redis-server,
# redis-cli, PostgreSQL 15 binaries in PG_BIN (/usr/lib/postgresql/15/bin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
SESSIONS=${SESSIONS:-64}
WARMUP=${WARMUP:-1}
ONLY=${ONLY:-memory redis cached_redis cluster sqlite postgres cached_db}
KEEP=${KEEP:-0}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SG_BIN=${SG_BIN:-$ROOT/target/release/sessiongate}
BASE_BIN=${BASE_BIN:-}
BASE_ENGINES=${BASE_ENGINES:-postgres cluster}

say() { printf '[engines.sh] %s\n' "$*" >&2; }
die() {
    printf '[engines.sh] ERROR: %s\n' "$*" >&2
    exit 1
}
int_in() { # name value min max
    [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3 && $2 <= $4)) || die "$1=$2: expected an integer from $3 to $4"
}
int_in DURATION "$DURATION" 1 120
int_in ROUNDS "$ROUNDS" 1 10
int_in CONNECTIONS "$CONNECTIONS" 1 1024
int_in THREADS "$THREADS" 1 16
int_in SESSIONS "$SESSIONS" 1 1024
int_in WARMUP "$WARMUP" 0 30
for t in wrk curl nginx redis-server redis-cli "$PG_BIN/initdb" "$PG_BIN/postgres"; do
    command -v "$t" >/dev/null || die "$t not found"
done
if [[ ! -x $SG_BIN ]]; then
    say "building sessiongate (cargo build --release --bin sessiongate)"
    cargo build --release --bin sessiongate >&2
fi
has() { [[ " $ONLY " == *" $1 "* ]]; }
ENGINES=(memory redis)
for e in cached_redis cluster sqlite postgres cached_db; do has "$e" && ENGINES+=("$e"); done
BASED=()
if [[ -n $BASE_BIN ]]; then
    [[ -x $BASE_BIN ]] || die "BASE_BIN=$BASE_BIN is not an executable"
    for e in $BASE_ENGINES; do
        [[ " ${ENGINES[*]} " == *" $e "* ]] || die "BASE_ENGINES: $e is not among the engines run"
        ENGINES+=("$e@base")
        BASED+=("$e")
    done
fi
sg_bin() { if [[ $1 == *@base ]]; then echo "$BASE_BIN"; else echo "$SG_BIN"; fi; }

WORK=$(mktemp -d /tmp/sg-engines.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USED_PORTS=" "
# Below the kernel's ephemeral range (as in load.sh): a port in it can be taken
# as the source port of an outgoing connection (wrk's, a proxy's) between the
# check and the bind, which made a server fail to start now and then. A
# cluster node also needs its bus port (the port + 10000) free and below it.
read -r EPH_LOW _ < <(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
((EPH_LOW > 22000)) || EPH_LOW=65536
PORT_MIN=10000
free_port() { # VAR [bus]: sets VAR to a port of 127.0.0.1 nothing listens on (not handed out before)
    # Locals with names no caller passes as VAR.
    local _fp _fi _fmax=$((EPH_LOW - 1))
    [[ ${2:-} == bus ]] && _fmax=$((EPH_LOW - 10001))
    for ((_fi = 0; _fi < 500; _fi++)); do
        _fp=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (_fmax - PORT_MIN + 1)))
        [[ $USED_PORTS == *" $_fp "* ]] && continue
        (exec 3<>"/dev/tcp/127.0.0.1/$_fp") 2>/dev/null && continue
        if [[ ${2:-} == bus ]]; then
            [[ $USED_PORTS == *" $((_fp + 10000)) "* ]] && continue
            (exec 3<>"/dev/tcp/127.0.0.1/$((_fp + 10000))") 2>/dev/null && continue
            USED_PORTS+="$((_fp + 10000)) "
        fi
        USED_PORTS+="$_fp "
        printf -v "$1" '%s' "$_fp"
        return 0
    done
    die "no free port found on 127.0.0.1"
}
start() { # name, command... (a child of this shell, in the foreground session)
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
}
wait_for() { # what, command... (retried for 20 s)
    local what=$1 i
    shift
    for ((i = 0; i < 200; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what not ready after 20 s (logs in $WORK)"
}

# ------------------------------------------------------------------ servers

free_port P_BACKEND
mkdir -p "$WORK/nginx/tmp"
NGINX_USER=""
[[ $(id -u) == 0 ]] && NGINX_USER="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        # reuseport: the kernel spreads the proxies' upstream connections over
        # the backend's workers. Without it one worker could take most of one
        # proxy's connections for the whole run (seen: 1.55 s against 0.65 s of
        # CPU in 5 s), a spread between runs that no round-robin evens out.
        listen 127.0.0.1:$P_BACKEND reuseport;
        location / { return 200 "hello from the backend\n"; }
        location /write {
            add_header X-Session-Update '{"n": \$connection_requests, "r": "\$request_id"}' always;
            return 200 "hello from the backend\n";
        }
    }
}
EOF
start nginx nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf"
wait_for "nginx" curl -sf "http://127.0.0.1:$P_BACKEND/"

free_port P_REDIS
mkdir -p "$WORK/redis"
start redis redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK/redis"
wait_for "redis-server" redis-cli -p "$P_REDIS" ping

if has cluster; then
    NODES=()
    for i in 1 2 3; do
        free_port p bus
        NODES+=("127.0.0.1:$p")
        mkdir -p "$WORK/cluster$i"
        start "cluster$i" redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
            --dir "$WORK/cluster$i" --cluster-enabled yes --cluster-config-file "$WORK/cluster$i/nodes.conf" \
            --cluster-node-timeout 5000
        wait_for "cluster node $i" redis-cli -p "$p" ping
    done
    redis-cli --cluster create "${NODES[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/cluster-create.log" 2>&1 ||
        die "redis-cli --cluster create: $(tail -3 "$WORK/cluster-create.log")"
    for n in "${NODES[@]}"; do
        wait_for "cluster_state:ok on $n" bash -c "redis-cli -p ${n#*:} cluster info | grep -q cluster_state:ok"
    done
fi

if has postgres || has cached_db; then
    free_port P_PG
    mkdir -p "$WORK/pg" "$WORK/pgsock"
    AS_PG=()
    if [[ $(id -u) == 0 ]]; then
        chown postgres:postgres "$WORK/pg" "$WORK/pgsock"
        AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" --auth=trust -U postgres >"$WORK/initdb.log" 2>&1 ||
        die "initdb: $(tail -3 "$WORK/initdb.log")"
    start postgres "${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$P_PG" -k "$WORK/pgsock" \
        -c listen_addresses=127.0.0.1 -c max_connections=200
    wait_for "postgres" "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$P_PG"
    PG_URL="postgres://postgres@127.0.0.1:$P_PG/postgres"
fi

declare -A PORT
sg_conf() { # engine -> $WORK/sg-ENGINE.toml
    local name=$1 e=${1%@base} store
    case $e in
    memory) store='engine = "memory"' ;;
    redis) store="engine = \"redis\"
url = \"redis://127.0.0.1:$P_REDIS/0\"" ;;
    cached_redis) store="engine = \"cached_redis\"
url = \"redis://127.0.0.1:$P_REDIS/2\"" ;;
    cluster) store="engine = \"redis\"
url = \"redis+cluster://$(
        IFS=,
        echo "${NODES[*]}"
    )\"" ;;
    sqlite) store="engine = \"db\"
url = \"sqlite://$WORK/sessions.sqlite3\"" ;;
    postgres) store="engine = \"db\"
url = \"$PG_URL\"" ;;
    cached_db) store="engine = \"cached_db\"
url = \"$PG_URL\"
cache_url = \"redis://127.0.0.1:$P_REDIS/1\"" ;;
    esac
    free_port "PORT[$name]"
    cat >"$WORK/sg-$name.toml" <<EOF
[server]
listen = "127.0.0.1:${PORT[$name]}"
tls = false
shutdown_grace = "1s"

[session]
secret_key = "sessiongate-engine-benchmark-secret-0123456789"

[store]
$store

[[route]]
name = "app"
path = "/"
upstream = "http://127.0.0.1:$P_BACKEND"
EOF
}
for e in "${ENGINES[@]}"; do
    sg_conf "$e"
    bin=$(sg_bin "$e")
    case ${e%@base} in sqlite | postgres | cached_db)
        "$bin" migrate --config "$WORK/sg-$e.toml" >"$WORK/migrate-$e.log" 2>&1 ||
            die "sessiongate migrate ($e): $(cat "$WORK/migrate-$e.log")"
        ;;
    esac
    "$bin" check --config "$WORK/sg-$e.toml" >"$WORK/check-$e.log" 2>&1 ||
        die "sessiongate check ($e): $(cat "$WORK/check-$e.log")"
    start "sg-$e" "$bin" run --config "$WORK/sg-$e.toml"
    wait_for "sessiongate ($e)" curl -sf "http://127.0.0.1:${PORT[$e]}/"
done

# ------------------------------------------------------------------ live sessions

for e in "${ENGINES[@]}"; do
    : >"$WORK/cookies-$e"
    for ((i = 0; i < SESSIONS; i++)); do
        c=$(curl -s -D - -o /dev/null --max-time 5 "http://127.0.0.1:${PORT[$e]}/write" |
            tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1)
        [[ -n $c ]] || die "no session cookie from the $e engine"
        echo "$c" >>"$WORK/cookies-$e"
    done
    # A write with the cookie keeps the key (no new Set-Cookie key): it names a live session.
    c2=$(curl -s -D - -o /dev/null --max-time 5 -H "Cookie: $c" "http://127.0.0.1:${PORT[$e]}/write" |
        tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(sessionid=[a-z0-9]\{32\}\);.*/\1/p' | head -1)
    [[ -z $c2 || $c2 == "$c" ]] || die "the $e engine did not keep the session ($c -> $c2)"
done

cat >"$WORK/rotate.lua" <<'EOF'
-- Each request carries the next of the live session cookies in COOKIES.
local cookies = {}
for line in io.lines(os.getenv("COOKIES")) do cookies[#cookies + 1] = line end
local path = os.getenv("SG_PATH")
local i = math.random(#cookies)
request = function()
    i = i % #cookies + 1
    return wrk.format("GET", path, { ["Cookie"] = cookies[i] })
end
EOF

# ------------------------------------------------------------------ rounds

ROWS=()
for e in "${ENGINES[@]}"; do ROWS+=("$e/read" "$e/write"); done
declare -A RPS   # "row round" -> 2xx requests/s
declare -A BAD   # row -> non-2xx/socket errors seen

run_wrk() { # row seconds -> prints "rps bad"
    local e=${1%/*} kind=${1#*/} path=/ out
    [[ $kind == write ]] && path=/write
    out=$(COOKIES="$WORK/cookies-$e" SG_PATH="$path" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${2}s" \
        -s "$WORK/rotate.lua" "http://127.0.0.1:${PORT[$e]}$path" 2>&1)
    echo "$out" >>"$WORK/wrk-${e}-${kind}.log"
    local total non2xx errs
    total=$(sed -n 's/^ *\([0-9]*\) requests in .*/\1/p' <<<"$out")
    non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' <<<"$out")
    errs=$(sed -n 's/^ *Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1+\2+\3+\4/p' <<<"$out")
    [[ -n $total ]] || die "wrk gave no result for $1: $out"
    echo "$(((total - ${non2xx:-0}) / $2)) $((${non2xx:-0} + ${errs:-0}))"
}

if ((WARMUP > 0)); then
    say "warm-up: ${WARMUP} s per row"
    for row in "${ROWS[@]}"; do run_wrk "$row" "$WARMUP" >/dev/null; done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    order=("${ROWS[@]}")
    if ((r % 2 == 0)); then
        order=()
        for ((i = ${#ROWS[@]} - 1; i >= 0; i--)); do order+=("${ROWS[i]}"); done
    fi
    for row in "${order[@]}"; do
        res=$(run_wrk "$row" "$DURATION") || die "wrk failed on $row"
        read -r rps bad <<<"$res"
        RPS["$row $r"]=$rps
        BAD[$row]=$((${BAD[$row]:-0} + bad))
        note=""
        ((bad > 0)) && note=" ($bad non-2xx/errors)"
        say "round $r/$ROUNDS $row: $rps req/s$note"
    done
done

# ------------------------------------------------------------------ report

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
row_median() { for ((r = 1; r <= ROUNDS; r++)); do echo "${RPS["$1 $r"]}"; done | median; }
ratio_median() { # row baseline
    for ((r = 1; r <= ROUNDS; r++)); do
        awk -v a="${RPS["$1 $r"]}" -v b="${RPS["$2 $r"]}" 'BEGIN {printf "%.3f\n", (b > 0 ? a / b : 0)}'
    done | median
}
ratio_rounds() {
    local r s=""
    for ((r = 1; r <= ROUNDS; r++)); do
        s+=$(awk -v a="${RPS["$1 $r"]}" -v b="${RPS["$2 $r"]}" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')
        ((r < ROUNDS)) && s+=", "
    done
    echo "$s"
}

{
    echo "- Command: \`DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=$CONNECTIONS THREADS=$THREADS SESSIONS=$SESSIONS WARMUP=$WARMUP benches/engines.sh\`"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (src modified)')"
    echo "- Machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(uname -sr); load generator, upstream, stores and proxies share them"
    echo "- Versions: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/'), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')"
    echo
    echo "| row | median req/s (2xx) | per round | non-2xx / socket errors | x memory (median of per-round ratios) |"
    echo "| --- | ---: | --- | ---: | ---: |"
    for row in "${ROWS[@]}"; do
        per=""
        for ((r = 1; r <= ROUNDS; r++)); do per+="${RPS["$row $r"]}"; ((r < ROUNDS)) && per+=", "; done
        base="memory/${row#*/}"
        echo "| \`$row\` | $(row_median "$row") | $per | ${BAD[$row]:-0} | $(ratio_median "$row" "$base") |"
    done
    echo
    echo "| goal | measured (median of per-round ratios; per round) | met |"
    echo "| --- | --- | --- |"
    goal() { # label row baseline min
        local m
        m=$(ratio_median "$2" "$3")
        echo "| $1 | ${m}x ($(ratio_rounds "$2" "$3")) | $(awk -v m="$m" -v g="$4" 'BEGIN {print (m >= g ? "yes" : "**no**")}') |"
    }
    has postgres && goal "PostgreSQL reads >= 0.5x memory's (17)" postgres/read memory/read 0.5
    has cached_db && goal "cached_db reads >= 0.9x redis's (17)" cached_db/read redis/read 0.9
    if has postgres; then
        w=$(row_median postgres/write)
        echo "| >= 5,000 acknowledged writes/s on PostgreSQL, $CONNECTIONS writers (17) | $w writes/s (${BAD[postgres/write]:-0} non-2xx/errors) | $(awk -v w="$w" 'BEGIN {print (w >= 5000 ? "yes" : "**no**")}') |"
    fi
    has cluster && goal "cluster reads >= 0.9x single-server redis's (20)" cluster/read redis/read 0.9
    has cluster && goal "cluster writes >= 0.9x single-server redis's (20)" cluster/write redis/write 0.9
    if ((${#BASED[@]} > 0)); then
        echo
        echo "| this build against BASE_BIN ($(basename "$BASE_BIN")) | median of per-round ratios (per round) |"
        echo "| --- | --- |"
        for e in "${BASED[@]}"; do
            for kind in read write; do
                echo "| \`$e/$kind\` / \`$e@base/$kind\` | $(ratio_median "$e/$kind" "$e@base/$kind")x ($(ratio_rounds "$e/$kind" "$e@base/$kind")) |"
            done
        done
    fi
} | tee "$WORK/report.md"
