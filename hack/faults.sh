#!/usr/bin/env bash
# make faults: build the release agent, control plane and bench, then run the fault
# suite (control plane or an endpoint killed, policy rewrites, SIGTERM, slowloris,
# idle connections) on loopback and print one table row per scenario. Sizes and the
# variables that change them: docs/benchmarks.md, "Fault suite".
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

"$CARGO" build --release -p bulwark-agent -p bulwark-control-plane -p bulwark-bench --bins

# 10,000 idle connections hold a socket on each side: the runner and the agent each
# need more than the usual 1,024 descriptors (both inherit this limit).
want=$(( ${FAULTS_IDLE:-10000} + 1024 ))
hard="$(ulimit -Hn)"
if [[ "$hard" != unlimited && "$hard" -lt "$want" ]]; then
    echo "faults: the hard limit on open files is $hard, below the $want that FAULTS_IDLE=${FAULTS_IDLE:-10000} needs; lower FAULTS_IDLE or raise the limit" >&2
fi
ulimit -n "$hard" 2>/dev/null || true

exec "$TARGET_DIR/release/bulwark-bench" faults "$@"
