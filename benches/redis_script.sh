#!/usr/bin/env bash
# What the redis engine's compare-and-set script (APPLY_LUA in
# src/store/redis/mod.rs, the script every acknowledged write runs) costs
# redis-server, in user-space instructions per call counted by valgrind's
# callgrind: a number the shared machine's load does not move, for
# comparing two versions of the script (requests/s through the whole proxy
# move by more than a script's change here).
#
#     benches/redis_script.sh [REV...]     # git revisions; default HEAD
#     N=20000 benches/redis_script.sh c51bf11 HEAD
#
# For each revision, the script is taken from `git show REV:src/store/redis/mod.rs`.
# For each of two servers (a plain redis-server, and one in cluster mode that
# holds every slot) and two sessions (one with no user entry, one whose
# entry's user the script checks, as after a load from a stamp), it runs
# redis-server under callgrind, writes the session's hash, and calls the
# script with redis-benchmark (one connection) N/5 times in one run and N
# times in another, with a version that always matches (every call
# writes). The difference of the two totals over the difference of the
# calls is the cost of one call, the network's included and the server's
# start-up not. The arguments follow HEAD's script (ARGV[10] '1': the state
# has no `u` or `x`); an older script ignores the ones it does not read.
#
# A second table counts the loads the same way: the `redis` engine's `HMGET`
# of the whole record, `cached_redis`'s version check as a plain `HGET`, and, for each
# revision that has it, the version-check script the `HGET` replaced
# (FRESH_LUA), with the version current.
#
# Needs valgrind, redis-server, redis-cli, redis-benchmark.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=${N:-10000}
[ $# -gt 0 ] || set -- HEAD
for t in valgrind redis-server redis-cli redis-benchmark; do
    command -v "$t" >/dev/null || { echo "[redis_script.sh] ERROR: $t not found" >&2; exit 1; }
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The text of script $2 (APPLY_LUA, FRESH_LUA) at revision $1, between
# `const NAME: &str = r"` and `";`; nothing when the revision has none.
extract() {
    git show "$1:src/store/redis/mod.rs" | python3 -c '
import re, sys
m = re.search(r"const " + sys.argv[1] + r": &str = r\"(.*?)\";", sys.stdin.read(), re.S)
sys.stdout.write(m.group(1) if m else "")' "$2"
}

# Instructions of one redis-server run that makes CALLS calls.
run() {
    local mode=$1 case=$2 lua=$3 calls=$4 dir port extra="" sha pid
    dir=$(mktemp -d "$TMP/run.XXXX")
    port=$((20000 + RANDOM % 20000))
    [ "$mode" = cluster ] && extra="--cluster-enabled yes --cluster-config-file $dir/nodes.conf"
    # shellcheck disable=SC2086
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
        redis-server --port "$port" --dir "$dir" --save '' --appendonly no $extra \
        >/dev/null 2>"$dir/valgrind.err" &
    pid=$!
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || {
            echo "[redis_script.sh] ERROR: redis-server on port $port did not start:" >&2
            tail -5 "$dir/valgrind.err" >&2
            exit 1
        }
        sleep 0.2
    done
    if [ "$mode" = cluster ]; then
        redis-cli -p "$port" cluster addslotsrange 0 16383 >/dev/null
        until redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok'; do sleep 0.2; done
    fi
    local k=sessiongate:s:abcdefghijklmnopqrstuvwxyz012345 v=0000000000000001
    local meta='d 1 2 9999999999999'
    local args
    if [ "$case" = load ]; then
        # $lua: a command (hmget, hget) or a version-check script file.
        redis-cli -p "$port" hset $k v $v m "$meta" d '{"n":1,"cart":[1,2,3]}' >/dev/null
        case $lua in
            hmget) args=(hmget $k v m d u x) ;;
            hget) args=(hget $k v) ;;
            *) args=(evalsha "$(redis-cli -p "$port" script load "$(cat "$lua")")" 1 $k $v) ;;
        esac
        redis-benchmark -p "$port" -n "$calls" -c 1 -q "${args[@]}" >/dev/null
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
        wait "$pid" || true
        grep -m1 '^summary:\|^totals:' "$dir/cg.out" | awk '{print $2}'
        return
    fi
    sha=$(redis-cli -p "$port" script load "$(cat "$lua")")
    if [ "$case" = no_user ]; then
        redis-cli -p "$port" hset $k v $v m "$meta" d '{"n":1,"cart":[1,2,3]}' >/dev/null
        args=(1 $k $v $v "$meta" '{"n":1,"cart":[1,2,3]}' 1209600000 '' 0 0 '' 1)
    else
        redis-cli -p "$port" hset $k v $v m "$meta" d '{"uid":"ann"}' u ann x 9999999999999 >/dev/null
        args=(1 $k $v $v "$meta" '{"uid":"ann"}' 1209600000 ann 9999999999999 1 ann 0)
    fi
    [ "$(redis-cli -p "$port" evalsha "$sha" "${args[@]}")" = 1 ] ||
        { echo "[redis_script.sh] ERROR: the script did not write" >&2; exit 1; }
    redis-benchmark -p "$port" -n "$calls" -c 1 -q evalsha "$sha" "${args[@]}" >/dev/null
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait "$pid" || true
    grep -m1 '^summary:\|^totals:' "$dir/cg.out" | awk '{print $2}'
}

echo "| revision | server | session | instructions per call |"
echo "| --- | --- | --- | ---: |"
per_call() {
    local a b
    a=$(run "$1" "$2" "$3" $((N / 5)))
    b=$(run "$1" "$2" "$3" "$N")
    echo $(((b - a) / (N - N / 5)))
}
for rev in "$@"; do
    lua="$TMP/$rev.apply.lua"
    extract "$rev" APPLY_LUA >"$lua"
    [ -s "$lua" ] || { echo "[redis_script.sh] ERROR: no APPLY_LUA at $rev" >&2; exit 1; }
    for mode in plain cluster; do
        for case in no_user checked_user; do
            echo "| $rev | $mode | $case | $(per_call $mode $case "$lua") |"
        done
    done
done

echo
echo "| load | instructions per call (plain server, version current) |"
echo "| --- | ---: |"
echo "| \`HMGET\` of the record (\`redis\`) | $(per_call plain load hmget) |"
echo "| \`HGET\` of the version (\`cached_redis\`) | $(per_call plain load hget) |"
for rev in "$@"; do
    lua="$TMP/$rev.fresh.lua"
    extract "$rev" FRESH_LUA >"$lua"
    [ -s "$lua" ] && echo "| version-check script at $rev | $(per_call plain load "$lua") |"
done
