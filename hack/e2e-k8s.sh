#!/usr/bin/env bash
# `make e2e-k8s`: the Kubernetes scenarios against a real cluster.
#
# Needs KUBECONFIG pointing at a disposable test cluster (kind, k3d, minikube), kubectl,
# python3 and the Rust toolchain. It installs the CRDs, creates namespace bulwark-e2e
# with a two-pod Deployment (pause containers) behind Service `reviews`, runs the
# control plane outside the cluster (`--source kubernetes`) and one agent on loopback,
# then checks what the agent receives and the policies' status conditions. It deletes
# the namespace when done (the CRDs stay). Not part of `make test`.
#
# Then the user journey (issue 5): helm install the chart, annotate a Deployment and
# label a namespace, check the pods carry the agent, apply a policy and see it reach
# the injected agent. It needs the images in the cluster: with E2E_KIND=CLUSTER it
# builds them (`make images`, docker or podman) and loads them into that kind cluster;
# with E2E_IMAGE_REPO (and E2E_IMAGE_TAG) it uses pushed images. With neither, the
# journey is skipped, and the script says so. helm comes from hack/install-helm.sh.
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
    if [ -n "${INSTALLED:-}" ]; then
        "$HELM" uninstall bulwark -n "$SYSTEM_NS" >/dev/null 2>&1 || true
        kubectl delete namespace "$APP_NS" "$LABELLED_NS" "$SYSTEM_NS" --wait=false >/dev/null 2>&1 || true
    fi
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

# ---------------------------------------------------------------------------
# The user journey: helm install -> annotate -> kubectl apply -> see it work.
SYSTEM_NS=bulwark-system
APP_NS=bulwark-e2e-app
LABELLED_NS=bulwark-e2e-labelled
HELM=${HELM:-$ROOT/.tools/bin/helm}
IMAGE_TAG=${E2E_IMAGE_TAG:-e2e}

if [ -z "${E2E_KIND:-}" ] && [ -z "${E2E_IMAGE_REPO:-}" ]; then
    printf '\nSKIPPED the install journey: set E2E_KIND=CLUSTER (build and load the images) or E2E_IMAGE_REPO\n'
    printf '\nall Kubernetes scenarios passed (without the install journey)\n'
    exit 0
fi
IMAGE_REPO=${E2E_IMAGE_REPO:-ghcr.io/bulwark-mesh}
[ -x "$HELM" ] || "$ROOT/hack/install-helm.sh"
for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
PIDS=()

if [ -n "${E2E_KIND:-}" ]; then
    step "build the images and load them into kind cluster $E2E_KIND"
    make -C "$ROOT" images IMAGE_REPO="$IMAGE_REPO" IMAGE_TAG="$IMAGE_TAG"
    kind load docker-image --name "$E2E_KIND" "$IMAGE_REPO/control-plane:$IMAGE_TAG" "$IMAGE_REPO/agent:$IMAGE_TAG"
fi

step "helm install"
INSTALLED=1
"$HELM" upgrade --install bulwark "$ROOT/charts/bulwark" -n "$SYSTEM_NS" --create-namespace \
    --set controlPlane.image.repository="$IMAGE_REPO/control-plane" \
    --set controlPlane.image.tag="$IMAGE_TAG" \
    --set agent.image.repository="$IMAGE_REPO/agent" \
    --set agent.image.tag="$IMAGE_TAG" \
    --wait --timeout 180s >"$WORK/helm-install.txt" 2>&1 || fail "helm install: $(cat "$WORK/helm-install.txt")"
grep -q "bulwark.io/inject=enabled" "$WORK/helm-install.txt" || fail "NOTES do not tell the next steps"
kubectl -n "$SYSTEM_NS" rollout status deployment/bulwark-control-plane --timeout=120s

# app NAMESPACE NAME: a Deployment answering HTTP on 8080 behind Service NAME:80.
app() {
    kubectl apply -n "$1" -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: $2
spec:
  selector: {app: $2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $2
spec:
  replicas: 1
  selector: {matchLabels: {app: $2}}
  template:
    metadata: {labels: {app: $2}}
    spec:
      containers:
        - name: app
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          args: [netexec, --http-port=8080]
          ports: [{containerPort: 8080, name: http}]
EOF
}
# injected NAMESPACE APP: the app's newest pod carries the agent and the record, and is Ready.
injected() {
    local pod
    pod=$(kubectl -n "$1" get pod -l "app=$2" --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')
    kubectl -n "$1" get pod "$pod" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}' | grep -q bulwark-agent &&
        kubectl -n "$1" get pod "$pod" -o jsonpath='{.metadata.annotations.bulwark\.io/injected}' | grep -q . &&
        kubectl -n "$1" get pod "$pod" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

step "annotate a Deployment"
kubectl create namespace "$APP_NS" --dry-run=client -o yaml | kubectl apply -f -
app "$APP_NS" web
kubectl -n "$APP_NS" rollout status deployment/web --timeout=120s
if injected "$APP_NS" web; then fail "web was injected before it asked"; fi
kubectl -n "$APP_NS" patch deployment web -p '{"spec":{"template":{"metadata":{"annotations":{"bulwark.io/inject":"enabled"}}}}}'
kubectl -n "$APP_NS" rollout status deployment/web --timeout=180s
eventually "the web pod carries the agent and is Ready" injected "$APP_NS" web

step "label a namespace"
kubectl create namespace "$LABELLED_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$LABELLED_NS" bulwark.io/inject=enabled --overwrite
app "$LABELLED_NS" api
kubectl -n "$LABELLED_NS" rollout status deployment/api --timeout=180s
eventually "the api pod carries the agent and is Ready" injected "$LABELLED_NS" api

step "apply a policy and see it reach the injected agent"
kubectl apply -f - <<EOF
apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: web
  namespace: $APP_NS
spec:
  targetRefs: [{kind: Service, name: web}]
  retry: {attempts: 3}
EOF
eventually "web's policy is Accepted" bash -c "kubectl -n $APP_NS get rp web -o jsonpath='{.status.conditions[0].reason}' | grep -qx Accepted"
POD=$(kubectl -n "$APP_NS" get pod -l app=web --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')
kubectl -n "$APP_NS" port-forward "pod/$POD" 24191:4191 >"$WORK/port-forward.log" 2>&1 &
PIDS+=($!)
web_attempts() {
    curl -fsS "http://127.0.0.1:24191/config" | python3 -c '
import json, sys
config = json.load(sys.stdin)["config"]
for d in config.get("destinations", []):
    if d["name"] == "web.'"$APP_NS"':80":
        print((d.get("retry") or {}).get("attempts"))
' | grep -qx 3
}
eventually "the injected agent retries web 3 times" web_attempts

printf '\nall Kubernetes scenarios passed, the install journey included\n'
