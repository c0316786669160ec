#!/usr/bin/env bash
# Runs the cargo-fuzz targets one at a time, each until it has used CPU_SECS
# of CPU time (not wall time: under `nice -n 19` on a busy machine a target
# may get much less than a core), then minimises its corpus into
# fuzz/corpus/<target>. Needs the nightly toolchain and cargo-fuzz.
#
#   scripts/fuzz.sh                      # every target, 600 CPU-seconds each
#   CPU_SECS=60 scripts/fuzz.sh path     # one target, one CPU-minute
#   SKIP_BUILD=1 scripts/fuzz.sh         # the targets as last built
#
# Findings land in fuzz/artifacts/<target>/; a line per target goes to
# fuzz/runs.log (target, CPU seconds, runs, exit status: 72 is the SIGINT
# that ends a clean run, anything else a finding or a failure).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

CPU_SECS=${CPU_SECS:-600}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(response_head chunked path directives cookie signed_cookie config request_head)
fi
# SKIP_BUILD=1: use the binaries already built.
[ -n "${SKIP_BUILD:-}" ] || cargo +nightly fuzz build
BIN=target/x86_64-unknown-linux-gnu/release

dict_for() {
    case "$1" in
        response_head | chunked | request_head) echo "-dict=dict/http.dict" ;;
        config) echo "-dict=dict/config.dict" ;;
    esac
}

for t in "${TARGETS[@]}"; do
    work="work/$t"
    mkdir -p "$work" "corpus/$t" "artifacts/$t"
    # shellcheck disable=SC2046
    nice -n 19 /usr/bin/time -v -o "work/$t.time" "$BIN/$t" \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
        $(dict_for "$t") "$work" "corpus/$t" >"work/$t.log" 2>&1 &
    timer=$!
    # The fuzzer is the child of `time`; stop it by SIGINT once it has used
    # CPU_SECS of CPU (utime + stime, in clock ticks).
    sleep 1
    pid=$(pgrep -P "$timer" | head -n1 || true)
    tick=$(getconf CLK_TCK)
    while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
        read -r -a st <"/proc/$pid/stat" || break
        used=$(((st[13] + st[14]) / tick))
        if [ "$used" -ge "$CPU_SECS" ]; then
            kill -INT "$pid"
            break
        fi
        sleep 5
    done
    status=0
    wait "$timer" || status=$?
    cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {printf "%.0f", s}' "work/$t.time")
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "work/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "$(date -u +%FT%TZ) $t cpu_s=$cpu runs=$runs status=$status" | tee -a runs.log
    # Minimise into the committed corpus.
    tmp="work/$t.min"
    rm -rf "$tmp" && mkdir -p "$tmp"
    # Edges only (no hit counts), greedy set cover: a small corpus that
    # still reaches every edge the run reached.
    nice -n 19 "$BIN/$t" -set_cover_merge=1 -use_counters=0 "$tmp" "corpus/$t" "$work" \
        >"work/$t.merge.log" 2>&1
    rm -rf "corpus/$t" && mv "$tmp" "corpus/$t"
done
