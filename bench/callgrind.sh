#!/usr/bin/env bash
# Instructions per request in the agent, counted by callgrind (docs/benchmarks.md,
# "Agent profile"). Starts the bench upstream, a control plane over a folder with one
# service (`bench.bench:80`, one endpoint), and the release agent under
# `valgrind --tool=callgrind`; warms up, zeroes the counters, drives a fixed rate
# through the outbound listener, dumps, and prints the dump's total / requests.
#
#   bench/callgrind.sh [none|all] [h1|h2|h2m8] [RATE] [SECONDS]
#
# `h2m8` is HTTP/2 with several streams in flight per connection, as `h2load -c4 -m8`
# drives it: 4 connections, 32 requests in flight (closed loop: RATE is not used), so
# that frames and wake-ups are shared between requests as under real load.
# `all` adds the bench's every-policy ResiliencePolicy (none triggers). Needs the
# release binaries (bulwark-agent, bulwark-control-plane, bulwark-bench) and valgrind.
# AGENT_BIN and CONTROL_PLANE_BIN run other builds (e.g. an older commit's, built in a
# worktree) with this tree's bench, so that two agents are compared under one load.
# PROXY=haproxy profiles HAProxy instead (the bench's config, one thread; `all` is the
# agent's only), under the same load, for the ratio the benchmarks report.
set -euo pipefail

POLICIES=${1:-none}
PROTOCOL=${2:-h1}
RATE=${3:-100}
SECONDS_=${4:-20}
BIN=${BIN_DIR:-target/release}
OUT=${CALLGRIND_OUT:-$BIN/bench-logs}
AGENT_BIN=${AGENT_BIN:-$BIN/bulwark-agent}
CONTROL_PLANE_BIN=${CONTROL_PLANE_BIN:-$BIN/bulwark-control-plane}
PROXY=${PROXY:-agent}

for tool in valgrind callgrind_control; do
	command -v "$tool" >/dev/null || { echo "callgrind: $tool not found (apt-get install valgrind)" >&2; exit 1; }
done
for bin in "$AGENT_BIN" "$CONTROL_PLANE_BIN" "$BIN/bulwark-bench"; do
	[[ -x $bin ]] || { echo "callgrind: $bin missing (cargo build --release -p ...)" >&2; exit 1; }
done
mkdir -p "$OUT"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # URL, what
	for _ in $(seq 1 600); do
		if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
		sleep 0.2
	done
	echo "callgrind: $2 never became ready ($1)" >&2
	return 1
}

PIDS=()
MESH=$(mktemp -d -t bulwark-callgrind-XXXXXX)
cleanup() {
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$MESH"
}
trap cleanup EXIT

UP=$(port) SINK=$(port) GRPC=$(port) CP_ADMIN=$(port) OUTBOUND=$(port) ADMIN=$(port)

"$BIN/bulwark-bench" upstream --http "127.0.0.1:$UP" --sink "127.0.0.1:$SINK" >"$OUT/callgrind-upstream.log" 2>&1 &
PIDS+=($!)

if [[ $PROXY == haproxy ]]; then
	HAPROXY_BIN=${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}
	[[ -x $HAPROXY_BIN ]] || { echo "callgrind: haproxy not found (hack/bench.sh installs it)" >&2; exit 1; }
	# The bench's own HAProxy config (bench/src/sut.rs): the load goes to its HTTP/1.1
	# or h2c frontend.
	H1_FRONT=$(port) H2_FRONT=$(port) TCP_FRONT=$(port)
	"$BIN/bulwark-bench" haproxy-config --h1 "127.0.0.1:$H1_FRONT" --h2 "127.0.0.1:$H2_FRONT" \
		--tcp "127.0.0.1:$TCP_FRONT" --http "127.0.0.1:$UP" --sink "127.0.0.1:$SINK" >"$MESH/haproxy.cfg"
	OUTBOUND=$H1_FRONT
	[[ $PROTOCOL == h2* ]] && OUTBOUND=$H2_FRONT
	DUMP="$OUT/callgrind.out.haproxy-$PROTOCOL"
	rm -f "$DUMP" "$DUMP".*
	valgrind --tool=callgrind --callgrind-out-file="$DUMP" "$HAPROXY_BIN" -db -f "$MESH/haproxy.cfg" \
		>"$OUT/callgrind-haproxy.log" 2>&1 &
	AGENT=$!
	PIDS+=($AGENT)
	for _ in $(seq 1 100); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$OUTBOUND") 2>/dev/null; then break; fi
		sleep 0.2
	done
else
cat >"$MESH/services.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: bench}
spec:
  selector: {app: bench}
  ports: [{name: http, port: 80, targetPort: $UP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-0
  namespace: bench
  labels: {kubernetes.io/service-name: bench}
addressType: IPv4
ports: [{name: http, port: $UP}]
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {ready: true}
EOF
if [[ $POLICIES == all ]]; then
	# The bench's every-policy set (bench/src/sut.rs, ALL_POLICIES), outbound part.
	cat >"$MESH/policies.yaml" <<'EOF'
apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: bench, namespace: bench}
spec:
  targetRefs: [{kind: Service, name: bench}]
  timeout: {request: 5s, connect: 1s}
  retry:
    attempts: 3
    perTryTimeout: 2s
    backoff: {base: 25ms, max: 250ms}
    retryOn: [connect-failure, reset, gateway-error]
    budget: {ratio: 0.2, minPerSecond: 10, window: 10s}
  circuitBreaker:
    consecutiveFailures: 5
    failureRatio: {threshold: 0.5, minRequests: 20, window: 10s}
    openDuration: 5s
  bulkhead: {maxConcurrentRequests: 4096, maxPending: 1024, queueTimeout: 250ms}
  loadBalancer: {strategy: LeastRequest}
EOF
fi

RUST_LOG=warn "$CONTROL_PLANE_BIN" --source "dir:$MESH" --grpc-addr "127.0.0.1:$GRPC" \
	--admin-addr "127.0.0.1:$CP_ADMIN" --debounce 50ms >"$OUT/callgrind-control-plane.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$CP_ADMIN/ready" "control plane"

DUMP="$OUT/callgrind.out.$POLICIES-$PROTOCOL"
rm -f "$DUMP" "$DUMP".*
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$DUMP" \
	"$AGENT_BIN" --control-plane "http://127.0.0.1:$GRPC" --namespace bench \
	--pod-name bench-0 --service-account bench --label app=bench \
	--outbound-addr "127.0.0.1:$OUTBOUND" --admin-addr "127.0.0.1:$ADMIN" \
	>"$OUT/callgrind-agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
wait_ready "http://127.0.0.1:$ADMIN/ready" "agent (first config applied)"

fi

WIRE=$PROTOCOL IN_FLIGHT=()
if [[ $PROTOCOL == h2m8 ]]; then WIRE=h2 IN_FLIGHT=(--connections 4 --concurrency 32); fi
load() { "$BIN/bulwark-bench" load --addr "127.0.0.1:$OUTBOUND" --authority bench.bench:80 --protocol "$WIRE" --rate "$1" --duration "$2" "${@:3}"; }
echo "warm-up: $(load 50 2)"
callgrind_control -z "$AGENT" >/dev/null
RESULT=$(load "$RATE" "$SECONDS_" "${IN_FLIGHT[@]}")
echo "measured: $RESULT"
callgrind_control -d "$AGENT" >/dev/null
sleep 1
OK=${RESULT%% ok*}
PART=$(ls -t "$DUMP".* | head -1)
TOTAL=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$PART" | head -1)
[[ -n $TOTAL ]] || TOTAL=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$PART" | head -1)
echo "proxy=$PROXY policies=$POLICIES protocol=$PROTOCOL rate=$RATE/s requests=$OK instructions=$TOTAL per-request=$((TOTAL / OK))"
echo "dump: $PART (callgrind_annotate $PART)"
