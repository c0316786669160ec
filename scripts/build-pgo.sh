#!/usr/bin/env bash
# A profile-guided (PGO) release build of sessiongate: the build to deploy.
#
#     scripts/build-pgo.sh          # prints the binary's path when done
#
# Three steps, about five minutes on two cores:
#   1. builds sessiongate with `-Cprofile-generate` (target/pgo-instrumented;
#      for the host target explicitly, so build scripts and proc-macros are not
#      instrumented);
#   2. runs it, with the default workers, in front of the bundled backend
#      (examples/bench_backend.rs, built without instrumentation), plain HTTP
#      and TLS, and sends it a training mix with curl: the `session = false`
#      route, reads with a live session cookie, writes (X-Session-Update),
#      new sessions, requests without a session, form POSTs, and over TLS
#      HTTP/1.1 and h2 reads and writes;
#   3. merges the profile with llvm-profdata (target/pgo-profiles, with the raw
#      profiles of the last run) and builds sessiongate again with
#      `-Cprofile-use`, and copies the binary to target/pgo/sessiongate.
# The release profile's settings (fat LTO, one codegen unit) apply to both
# builds. Nothing else in the tree changes: `cargo build --release` stays an
# ordinary build.
#
# llvm-profdata must come from the same LLVM as rustc. The script takes the
# one of the rustup component `llvm-tools` (and adds the component with
# rustup when it is missing, unless INSTALL=0), else `llvm-profdata-<major>`
# or `llvm-profdata` on PATH when its LLVM major version is rustc's.
#
# RUSTFLAGS from the environment are kept (the PGO flags are added to them);
# rustflags from .cargo/config.toml files are not, as with any RUSTFLAGS.
# CARGO_ENCODED_RUSTFLAGS, which would make cargo ignore RUSTFLAGS, is refused.
#
# Environment: REQUESTS (training requests per scenario, default 20000),
# INSTALL (0: never call rustup), KEEP=1 (keep the temporary directory with
# the training's configuration, certificate and logs), CARGO_TARGET_DIR as
# for cargo (a path without spaces).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")
cd "$ROOT"
REQUESTS=${REQUESTS:-20000}
INSTALL=${INSTALL:-1}
KEEP=${KEEP:-0}

say() { printf '[build-pgo] %s\n' "$*" >&2; }
die() {
    printf '[build-pgo] ERROR: %s\n' "$*" >&2
    exit 1
}
[[ $REQUESTS =~ ^[0-9]+$ ]] && ((REQUESTS >= 1000 && REQUESTS <= 10000000)) ||
    die "REQUESTS=$REQUESTS: expected an integer from 1000 to 10000000"
for tool in cargo rustc curl openssl sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
# curl sends the training in parallel transfers: -Z (7.66) and
# --no-progress-meter (7.67).
CURL_VERSION=$(curl --version | sed -n '1s/^curl \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
read -r CURL_MAJOR CURL_MINOR <<<"${CURL_VERSION:-0 0}"
((CURL_MAJOR > 7 || (CURL_MAJOR == 7 && CURL_MINOR >= 67))) ||
    die "curl 7.67 or newer is required (found: $(curl --version | head -1))"
[[ -z ${CARGO_ENCODED_RUSTFLAGS:-} ]] ||
    die "CARGO_ENCODED_RUSTFLAGS is set: cargo would ignore the PGO flags; unset it (RUSTFLAGS is kept)"
[[ $TARGET_DIR != *[[:space:]]* ]] ||
    die "the target directory '$TARGET_DIR' has a space in its path, which RUSTFLAGS cannot carry"
USER_RUSTFLAGS=${RUSTFLAGS:-}

# ---------------------------------------------------------------- llvm-profdata

llvm_major() { # the LLVM major version a tool reports (rustc -vV or llvm-profdata --version)
    sed -n 's/.*LLVM version:\{0,1\} \([0-9][0-9]*\)\..*/\1/p' | head -1
}
RUSTC_LLVM=$(rustc -vV | llvm_major)
[[ -n $RUSTC_LLVM ]] || die "could not read rustc's LLVM version from 'rustc -vV'"
HOST=$(rustc -vV | sed -n 's/^host: //p')
SYSROOT_PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
find_profdata() {
    if [[ -x $SYSROOT_PROFDATA ]]; then
        echo "$SYSROOT_PROFDATA"
        return 0
    fi
    local cand
    for cand in "llvm-profdata-$RUSTC_LLVM" llvm-profdata; do
        if command -v "$cand" >/dev/null &&
            [[ $("$cand" --version 2>&1 | llvm_major) == "$RUSTC_LLVM" ]]; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}
if ! PROFDATA=$(find_profdata); then
    if [[ $INSTALL == 1 ]] && command -v rustup >/dev/null; then
        say "adding the rustup component llvm-tools (llvm-profdata for rustc's LLVM $RUSTC_LLVM)"
        rustup component add llvm-tools >&2 || die "rustup component add llvm-tools failed"
    fi
    PROFDATA=$(find_profdata) || die "no llvm-profdata for LLVM $RUSTC_LLVM (rustc's):" \
        "run 'rustup component add llvm-tools', or install llvm-profdata-$RUSTC_LLVM"
fi
say "llvm-profdata: $PROFDATA (LLVM $RUSTC_LLVM, as rustc)"

# ---------------------------------------------------------------- processes

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sessiongate-pgo.XXXXXX")
PIDS=()
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $KEEP == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a server whose log names its URL (it listens on port 0) and sets
# the variable $1 to that URL.
start() { # VAR log command...
    local var=$1 log=$2 i url
    shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
    for ((i = 0; i < 100; i++)); do
        url=$(grep -o 'https\?://[0-9.]*:[0-9]*' "$log" | head -1 || true)
        if [[ -n $url ]]; then
            printf -v "$var" '%s' "$url"
            return 0
        fi
        kill -0 "${PIDS[-1]}" 2>/dev/null || die "$var ($1) exited: $(tail -5 "$log")"
        sleep 0.1
    done
    die "$var ($1) did not start within 10 s: $(tail -5 "$log")"
}

# ---------------------------------------------------------------- 1. instrumented build

# A fixed path for the raw profiles: it is part of RUSTFLAGS, so a new path
# each time would rebuild the instrumented binary each time.
PROFILES="$TARGET_DIR/pgo-profiles"
RAW="$PROFILES/raw"
GEN_DIR="$TARGET_DIR/pgo-instrumented"
say "1/3 instrumented build (-Cprofile-generate, target dir $GEN_DIR)"
RUSTFLAGS="$USER_RUSTFLAGS -Cprofile-generate=$RAW" CARGO_TARGET_DIR="$GEN_DIR" \
    cargo build --release --target "$HOST" --bin sessiongate >&2
say "building the bundled backend (not instrumented, target dir $TARGET_DIR)"
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --example bench_backend >&2

# ---------------------------------------------------------------- 2. training

rm -rf "$RAW" # profiles of an earlier run, perhaps of an older build
say "2/3 training: $REQUESTS requests per scenario"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >"$WORK/openssl.log" 2>&1 ||
    die "openssl could not make a certificate: $(tail -3 "$WORK/openssl.log")"
start BACKEND "$WORK/backend.log" "$TARGET_DIR/release/examples/bench_backend" 127.0.0.1:0
sg_conf() { # file tls-lines
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:0"
$2
shutdown_grace = "2s"

[session]
secret_key = "sessiongate-pgo-training-secret-0123456789"

[store]
engine = "memory"

[[route]]
name = "static"
path = "/static"
upstream = "$BACKEND"
session = false

[[route]]
name = "app"
path = "/"
upstream = "$BACKEND"
EOF
}
sg_conf "$WORK/plain.toml" 'tls = false'
sg_conf "$WORK/tls.toml" "tls = true
cert = \"$WORK/cert.pem\"
key = \"$WORK/key.pem\""
SG_GEN="$GEN_DIR/$HOST/release/sessiongate"
# RUST_LOG=info: the URL is read from the "listening" line of the log.
start PLAIN "$WORK/sg-plain.log" env RUST_LOG=info "$SG_GEN" run --config "$WORK/plain.toml"
start TLS "$WORK/sg-tls.log" env RUST_LOG=info "$SG_GEN" run --config "$WORK/tls.toml"

cookie_of() { # url curl-options...: the session cookie a /write sets
    local url=$1
    shift
    curl -sS --max-time 10 "$@" -o /dev/null -D - "$url/write" |
        sed -n 's/^[Ss]et-[Cc]ookie: *sessionid=\([^;]*\);.*/\1/p' | head -1
}
C_PLAIN=$(cookie_of "$PLAIN") || die "no answer from $PLAIN/write"
C_TLS=$(cookie_of "$TLS" -k) || die "no answer from $TLS/write"
[[ -n $C_PLAIN && -n $C_TLS ]] || die "no session cookie from the training servers"

# Sends n requests, 32 at a time on reused connections, and checks that all
# of them were answered 200.
train() { # name n url curl-options...
    local name=$1 n=$2 url=$3 codes ok
    shift 3
    codes=$(curl -sS --no-progress-meter -Z --parallel-max 32 "$@" \
        -o /dev/null -w '%{http_code}\n' "$url?[1-$n]" || true)
    ok=$(grep -cx 200 <<<"$codes" || true)
    ((ok == n)) || die "training '$name': $ok of $n requests answered 200;" \
        "other statuses: $(grep -vx 200 <<<"$codes" | sort | uniq -c | head -5 | tr -s ' \n' ' ')"
    say "  $name: $n requests"
}
N=$REQUESTS
train "session=false route" "$N" "$PLAIN/static/"
train "read, live session" "$((N * 2))" "$PLAIN/" -b "sessionid=$C_PLAIN"
train "write, live session" "$N" "$PLAIN/write" -b "sessionid=$C_PLAIN"
train "write, new session each" "$((N / 2))" "$PLAIN/write"
train "no session" "$((N / 2))" "$PLAIN/"
train "form POST, live session" "$((N / 2))" "$PLAIN/form" -b "sessionid=$C_PLAIN" -d 'name=value&other=1'
train "TLS HTTP/1.1 read" "$N" "$TLS/" -k --http1.1 -b "sessionid=$C_TLS"
train "TLS h2 read" "$N" "$TLS/" -k --http2 -b "sessionid=$C_TLS"
train "TLS h2 write" "$((N / 2))" "$TLS/write" -k --http2 -b "sessionid=$C_TLS"

# The profile is written when the instrumented processes exit.
for pid in "${PIDS[@]:1}"; do
    kill -TERM "$pid" 2>/dev/null || die "the instrumented sessiongate (pid $pid) had already exited"
    wait "$pid" || die "the instrumented sessiongate did not exit cleanly (status $?)"
done
PIDS=("${PIDS[0]}")
compgen -G "$RAW/*.profraw" >/dev/null || die "the instrumented build wrote no profile in $RAW"

# ---------------------------------------------------------------- 3. optimised build

# The merged profile is named by its hash: -Cprofile-use then changes with
# it, and cargo rebuilds instead of keeping a build from an older profile.
"$PROFDATA" merge -o "$WORK/merged.profdata" "$RAW" >&2
SUM=$(sha256sum "$WORK/merged.profdata" | cut -c1-16)
rm -f "$PROFILES"/*.profdata
PROFILE="$PROFILES/sessiongate-$SUM.profdata"
mv "$WORK/merged.profdata" "$PROFILE"
USE_DIR="$TARGET_DIR/pgo"
say "3/3 optimised build (-Cprofile-use=$PROFILE, target dir $USE_DIR)"
RUSTFLAGS="$USER_RUSTFLAGS -Cprofile-use=$PROFILE -Cllvm-args=-pgo-warn-missing-function=false" \
    CARGO_TARGET_DIR="$USE_DIR" cargo build --release --target "$HOST" --bin sessiongate >&2
BUILT="$USE_DIR/$HOST/release/sessiongate"
[[ -x $BUILT ]] || die "the optimised build left no binary at $BUILT"
BIN="$USE_DIR/sessiongate"
cp "$BUILT" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
say "done: $BIN"
echo "$BIN"
