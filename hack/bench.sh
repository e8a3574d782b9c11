#!/usr/bin/env bash
# make bench: build release binaries, install HAProxy and valgrind if they are missing, and run the
# benchmarks with the runner (the load generator) and the upstream on BENCH_LOAD_CPUS
# and every proxy on BENCH_PROXY_CPUS. Durations and sizes: see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if [[ "${BENCH_HAPROXY:-1}" != 0 ]] && ! command -v haproxy >/dev/null && [[ ! -x /usr/sbin/haproxy ]]; then
    echo "bench: installing HAProxy (the peer the agent is compared with)" >&2
    if ! command -v apt-get >/dev/null; then
        echo "bench: no apt-get here; install haproxy yourself or run with BENCH_HAPROXY=0" >&2
        exit 1
    fi
    SUDO=""
    [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null
    # The package starts a system service on Debian; the bench runs its own instance.
    $SUDO systemctl stop haproxy 2>/dev/null || true
fi

# Instructions per request (BENCH_CALLGRIND, docs/benchmarks.md) need valgrind.
if [[ "${BENCH_CALLGRIND:-auto}" != 0 ]] && ! command -v valgrind >/dev/null && command -v apt-get >/dev/null; then
    echo "bench: installing valgrind (instructions per request under callgrind)" >&2
    SUDO=""
    [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
fi

"$CARGO" build --release -p bulwark-agent -p bulwark-control-plane -p bulwark-bench --bins

# 10,000 simulated agents hold a few thousand sockets on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

LOAD_CPUS="${BENCH_LOAD_CPUS-0}"
PIN=()
if [[ -n "$LOAD_CPUS" ]] && command -v taskset >/dev/null; then
    PIN=(taskset -c "$LOAD_CPUS")
fi
exec "${PIN[@]}" "$TARGET_DIR/release/bulwark-bench" run "$@"
