#!/usr/bin/env bash
# `make e2e-k8s`: the Kubernetes scenarios against a real cluster.
#
# Needs KUBECONFIG pointing at a disposable test cluster (kind, k3d, minikube), kubectl,
# python3 and the Rust toolchain. It installs the CRDs, creates namespace bulwark-e2e
# with a two-pod Deployment (pause containers) behind Service `reviews`, runs the
# control plane outside the cluster (`--source kubernetes`) and one agent on loopback,
# then checks what the agent receives and the policies' status conditions. It deletes
# the namespace when done (the CRDs stay). Not part of `make test`.
set -euo pipefail

: "${KUBECONFIG:?set KUBECONFIG to the kubeconfig of a disposable test cluster}"
export KUBECONFIG

NS=bulwark-e2e
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
CP_GRPC=127.0.0.1:19990
CP_ADMIN=127.0.0.1:19991
AGENT_ADMIN=127.0.0.1:14191
DEADLINE=${E2E_DEADLINE:-60}
PIDS=()

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    for log in "$WORK"/*.log; do
        [ -f "$log" ] || continue
        printf -- '--- last lines of %s\n' "$(basename "$log")" >&2
        tail -n 30 "$log" >&2
    done
    exit 1
}
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# eventually DESCRIPTION COMMAND...: retries COMMAND every second until it succeeds.
eventually() {
    local what=$1
    shift
    for _ in $(seq "$DEADLINE"); do
        if "$@" >/dev/null 2>&1; then
            echo "ok: $what"
            return 0
        fi
        sleep 1
    done
    fail "$what (after ${DEADLINE}s)"
}

# accepted KIND NAME: prints status/reason/observedGeneration of the Accepted condition.
accepted() {
    kubectl -n "$NS" get "$1" "$2" -o \
        jsonpath='{range .status.conditions[?(@.type=="Accepted")]}{.status}/{.reason}/{.observedGeneration}{end}'
}
condition_is() { [ "$(accepted "$1" "$2")" = "$3" ]; }

# agent_attempts: the retry attempts the agent runs for reviews.bulwark-e2e:80.
agent_attempts() {
    curl -fsS "http://$AGENT_ADMIN/config" | python3 -c '
import json, sys
config = json.load(sys.stdin)["config"]
for d in config.get("destinations", []):
    if d["name"] == "reviews.'"$NS"':80":
        print((d.get("retry") or {}).get("attempts"), len(d.get("endpoints", [])))
'
}
agent_has() { [ "$(agent_attempts)" = "$1" ]; }

policy() { # NAME ATTEMPTS_OR_EXTRA
    cat <<EOF
apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: $1
  namespace: $NS
spec:
  targetRefs:
    - kind: Service
      name: reviews
  retry:
$2
EOF
}

step "build"
(cd "$ROOT" && cargo build --quiet -p bulwark-control-plane -p bulwark-agent --bins)

step "install the CRDs"
kubectl apply -f "$ROOT/charts/bulwark/crds/"
kubectl wait --for=condition=Established --timeout=60s \
    crd/resiliencepolicies.bulwark.io crd/ratelimitpolicies.bulwark.io crd/shardtopologies.bulwark.io
kubectl explain resiliencepolicy.spec.retry.attempts | grep -q "Tries in all" ||
    fail "kubectl explain does not describe spec.retry.attempts"

step "a namespace with a two-pod service"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n "$NS" -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews
spec:
  replicas: 2
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews, version: v1}}
    spec:
      containers:
        - name: pause
          image: registry.k8s.io/pause:3.9
          ports: [{containerPort: 8080, name: http}]
EOF
kubectl -n "$NS" rollout status deployment/reviews --timeout=120s

step "the control plane, outside the cluster, and an agent"
"$TARGET/debug/bulwark-control-plane" --source kubernetes \
    --grpc-addr "$CP_GRPC" --admin-addr "$CP_ADMIN" \
    --lease-namespace "$NS" --identity "e2e-$$" >"$WORK/control-plane.log" 2>&1 &
PIDS+=($!)
eventually "the control plane is ready" curl -fsS "http://$CP_ADMIN/ready"
"$TARGET/debug/bulwark-agent" --control-plane "http://$CP_GRPC" \
    --namespace "$NS" --pod-name e2e-client --label app=client \
    --outbound-addr 127.0.0.1:14140 --admin-addr "$AGENT_ADMIN" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
eventually "the agent is ready" curl -fsS "http://$AGENT_ADMIN/ready"
eventually "the agent knows reviews with its two endpoints" agent_has "None 2"

step "a policy reaches the agent and is Accepted"
policy reviews "    attempts: 2" | kubectl apply -f -
eventually "the agent retries reviews twice" agent_has "2 2"
eventually "reviews is Accepted" condition_is rp reviews "True/Accepted/1"
kubectl get bulwark -n "$NS"

step "a change follows"
policy reviews "    attempts: 4" | kubectl apply -f -
eventually "the agent retries reviews 4 times" agent_has "4 2"
eventually "generation 2 is Accepted" condition_is rp reviews "True/Accepted/2"

step "the schema refuses what it can at admission"
if policy reviews "    attempts: 11" | kubectl apply -f - >"$WORK/admission.txt" 2>&1; then
    fail "attempts: 11 was admitted"
fi
grep -q "attempts" "$WORK/admission.txt" || fail "the admission error does not name the field: $(cat "$WORK/admission.txt")"
echo "ok: attempts: 11 refused at admission"
if policy reviews "    backoff: {base: 2s, max: 1s}" | kubectl apply -f - >"$WORK/cel.txt" 2>&1; then
    echo "note: the cluster has no CEL validation; the control plane reports it instead"
    eventually "the control plane marks it Invalid" condition_is rp reviews "False/Invalid/3"
    policy reviews "    attempts: 4" | kubectl apply -f -
else
    grep -q "base must not exceed max" "$WORK/cel.txt" || fail "unexpected CEL error: $(cat "$WORK/cel.txt")"
    echo "ok: base > max refused by CEL"
fi

step "what only the control plane can check: Invalid, and agents keep the last good version"
policy reviews "    attempts: 4
    grpcCodes: [no-such-code]" | kubectl apply -f -
eventually "reviews is Invalid" bash -c "kubectl -n $NS get rp reviews -o jsonpath='{.status.conditions[0].reason}' | grep -qx Invalid"
kubectl -n "$NS" get rp reviews -o jsonpath='{.status.conditions[0].message}' | grep -q "spec.retry.grpcCodes\[0\]" ||
    fail "the Invalid message does not name spec.retry.grpcCodes[0]"
agent_has "4 2" || fail "the agent lost the last accepted version"
echo "ok: the agent still retries 4 times"

step "a younger policy on the same service is Conflicted"
policy reviews "    attempts: 4" | kubectl apply -f -
sleep 1 # creation timestamps have one-second resolution
policy reviews-late "    attempts: 7" | kubectl apply -f -
eventually "reviews-late is Conflicted" bash -c "kubectl -n $NS get rp reviews-late -o jsonpath='{.status.conditions[0].reason}' | grep -qx Conflicted"
kubectl -n "$NS" get rp reviews-late -o jsonpath='{.status.conditions[0].message}' | grep -q "$NS/reviews takes precedence" ||
    fail "the Conflicted message does not name the winner"

step "deleting the winner hands over"
kubectl -n "$NS" delete rp reviews
eventually "the agent retries 7 times" agent_has "7 2"
eventually "reviews-late is Accepted" bash -c "kubectl -n $NS get rp reviews-late -o jsonpath='{.status.conditions[0].reason}' | grep -qx Accepted"

step "endpoints follow the pods"
kubectl -n "$NS" scale deployment/reviews --replicas=1
eventually "the agent has one endpoint left" agent_has "7 1"

printf '\nall Kubernetes scenarios passed\n'
