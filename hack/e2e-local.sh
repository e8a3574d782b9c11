#!/usr/bin/env bash
# `make e2e-local`: Bulwark against a real API server that has no nodes.
#
# For a cluster with kube-apiserver, etcd and the controller manager but no kubelet or
# scheduler, such as the one ../shared/k8s-local/up.sh starts: Pods are created (through
# the real admission chain) and stay Pending, without IPs. So the control plane and
# the agents run here as local processes, the control plane with the chart's
# ServiceAccount token (the chart's RBAC is what is tested), and the API server calls the
# local webhook at https://127.0.0.1:PORT.
#
# It builds the debug binaries, installs the chart into bulwark-system (helm install, or
# `helm template --kube-version 1.29.0 | kubectl apply --server-side` on servers older
# than the chart allows), checks the RBAC with `kubectl auth can-i`, injection (pod
# annotation, namespace label, a denied annotation), an agent's config for a Service
# backed by a manual EndpointSlice, policy status (Accepted, Invalid, Conflicted,
# TargetNotFound, refusals by the schema and CEL), edits and deletes, PeerAuthentication
# (kubectl explain, defaults, precedence, conflicts, refusals), and a control-plane
# restart that takes the status Lease over. Then workload identity as the chart turns it
# on (issue 15): the issuer Secret (helm install and upgrade keep it), identity's RBAC, the
# control plane with the chart's identity flags serving TLS, the trust-anchor ConfigMaps
# and their rotation, real TokenReviews, agents with a bound token and a forged one, and
# the token volume in injected pods. On exit it stops its processes and deletes
# its namespaces and the chart's objects (the CRDs stay, as with helm uninstall).
#
# E2E_SKIP_BUILD=1 uses the binaries already in target/debug; E2E_DEADLINE (default 60)
# is how many seconds each eventual check waits.
# Needs KUBECONFIG (default ~/.cache/bulwark-k8s/kubeconfig when it exists), kubectl,
# curl, openssl, python3 and the Rust toolchain; helm comes from hack/install-helm.sh.
# Not part of `make test`. Re-runnable.
set -euo pipefail

if [ -z "${KUBECONFIG:-}" ] && [ -f "$HOME/.cache/bulwark-k8s/kubeconfig" ]; then
    KUBECONFIG=$HOME/.cache/bulwark-k8s/kubeconfig
fi
: "${KUBECONFIG:?set KUBECONFIG to the kubeconfig of a disposable API server (see ../shared/k8s-local)}"
export KUBECONFIG

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
HELM=${HELM:-$ROOT/.tools/bin/helm}
CHART=$ROOT/charts/bulwark
RELEASE=bulwark
SYSTEM_NS=bulwark-system
APP_NS=bulwark-e2e-app
LABELLED_NS=bulwark-e2e-labelled
LEASE=bulwark-control-plane
DEADLINE=${E2E_DEADLINE:-60}
WORK=$(mktemp -d)
PIDS=()
CHECKS=0
SUMMARY=()

step() {
    printf '\n==> %s\n' "$*"
    SUMMARY+=("$*")
}
ok() {
    echo "ok: $*"
    CHECKS=$((CHECKS + 1))
}
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    for log in "$WORK"/*.log; do
        [ -f "$log" ] || continue
        printf -- '--- last lines of %s\n' "$(basename "$log")" >&2
        tail -n 30 "$log" >&2
    done
    exit 1
}

# eventually DESCRIPTION COMMAND...: retries COMMAND every second until it succeeds.
eventually() {
    local what=$1
    shift
    for _ in $(seq "$DEADLINE"); do
        if "$@" >/dev/null 2>&1; then
            ok "$what"
            return 0
        fi
        sleep 1
    done
    fail "$what (after ${DEADLINE}s)"
}

# gone NAMESPACE...: waits until the namespaces no longer exist (a previous run's, Terminating).
gone() {
    for _ in $(seq 120); do
        [ -n "$(kubectl get namespace "$@" --ignore-not-found -o name 2>/dev/null)" ] || return 0
        sleep 1
    done
    echo "warning: namespaces still present: $*" >&2
}

# stop PID: SIGTERM, then waits for it (the control plane releases its Lease on SIGTERM).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

CREATED_SYSTEM_NS=
INSTALL_MODE=
cleanup() {
    local status=$?
    set +e
    for pid in "${PIDS[@]}"; do stop "$pid"; done
    kubectl delete namespace "$APP_NS" "$LABELLED_NS" --ignore-not-found --wait=false >/dev/null 2>&1
    case "$INSTALL_MODE" in
    helm) "$HELM" uninstall "$RELEASE" -n "$SYSTEM_NS" >/dev/null 2>&1 ;;
    template) kubectl delete -f "$WORK/chart.yaml" --ignore-not-found --wait=false >/dev/null 2>&1 ;;
    esac
    kubectl -n "$SYSTEM_NS" delete lease "$LEASE" --ignore-not-found >/dev/null 2>&1
    if [ -n "$CREATED_SYSTEM_NS" ]; then
        kubectl delete namespace "$SYSTEM_NS" --ignore-not-found --wait=false >/dev/null 2>&1
        gone "$APP_NS" "$LABELLED_NS" "$SYSTEM_NS"
    else
        gone "$APP_NS" "$LABELLED_NS"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

# free_ports N: N free TCP ports on loopback.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r CP_GRPC_PORT CP_ADMIN_PORT WEBHOOK_PORT AGENT_OUT_PORT AGENT_ADMIN_PORT <<<"$(free_ports 5)"
CP_GRPC=127.0.0.1:$CP_GRPC_PORT
CP_ADMIN=127.0.0.1:$CP_ADMIN_PORT
AGENT_ADMIN=127.0.0.1:$AGENT_ADMIN_PORT

# ---------------------------------------------------------------------------
step "the API server and the build"
SERVER_VERSION=$(kubectl version -o json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)["serverVersion"]
print(v["gitVersion"], v["major"], "".join(c for c in v["minor"] if c.isdigit()))
') || fail "cannot reach the API server in $KUBECONFIG"
read -r SERVER_GIT SERVER_MAJOR SERVER_MINOR <<<"$SERVER_VERSION"
ok "the API server answers: $SERVER_GIT"
if [ -n "${E2E_SKIP_BUILD:-}" ]; then
    echo "E2E_SKIP_BUILD is set: using the binaries in $TARGET/debug as they are"
else
    (cd "$ROOT" && cargo build --quiet -p bulwark-control-plane -p bulwark-agent --bins) || fail "cargo build"
fi
for bin in bulwark-control-plane bulwark-agent; do
    [ -x "$TARGET/debug/$bin" ] || fail "no $TARGET/debug/$bin"
done
ok "built $TARGET/debug/bulwark-control-plane and bulwark-agent"
[ -x "$HELM" ] || "$ROOT/hack/install-helm.sh" >/dev/null
# Leftovers of an interrupted run.
kubectl delete namespace "$APP_NS" "$LABELLED_NS" --ignore-not-found --wait=false >/dev/null
gone "$APP_NS" "$LABELLED_NS"

# ---------------------------------------------------------------------------
step "install the chart into $SYSTEM_NS"
if ! kubectl get namespace "$SYSTEM_NS" >/dev/null 2>&1; then
    kubectl create namespace "$SYSTEM_NS" >/dev/null
    CREATED_SYSTEM_NS=1
fi
# The chart's objects without the CRDs: what cleanup deletes (the CRDs stay, as with helm).
"$HELM" template "$RELEASE" "$CHART" -n "$SYSTEM_NS" --kube-version 1.29.0 >"$WORK/chart.yaml"
if [ "$SERVER_MAJOR" -eq 1 ] && [ "$SERVER_MINOR" -lt 25 ]; then
    echo "server $SERVER_GIT is older than the chart's kubeVersion >=1.25: helm template --kube-version 1.29.0 | kubectl apply --server-side"
    INSTALL_MODE=template
    "$HELM" template "$RELEASE" "$CHART" -n "$SYSTEM_NS" --include-crds --kube-version 1.29.0 |
        kubectl apply --server-side --force-conflicts -f - >"$WORK/install.txt" 2>&1 ||
        fail "kubectl apply of the rendered chart: $(cat "$WORK/install.txt")"
else
    echo "server $SERVER_GIT: helm install"
    INSTALL_MODE=helm
    "$HELM" upgrade --install "$RELEASE" "$CHART" -n "$SYSTEM_NS" >"$WORK/install.txt" 2>&1 ||
        fail "helm install: $(cat "$WORK/install.txt")"
fi
ok "the chart is installed ($INSTALL_MODE)"
kubectl wait --for=condition=Established --timeout=60s crd/resiliencepolicies.bulwark.io \
    crd/ratelimitpolicies.bulwark.io crd/shardtopologies.bulwark.io crd/authorizationpolicies.bulwark.io \
    crd/peerauthentications.bulwark.io >/dev/null || fail "the CRDs are not Established"
ok "the five CRDs are Established"
# The server republishes its OpenAPI a moment after a CRD changes.
explains() { grep -q "Tries in all" <<<"$(kubectl explain resiliencepolicy.spec.retry.attempts 2>/dev/null)"; }
eventually "kubectl explain resiliencepolicy.spec.retry.attempts describes the field" explains
# explained FIELD PHRASE: kubectl explain FIELD says PHRASE (its lines joined: it wraps them).
explained() { kubectl explain "$1" 2>/dev/null | tr -s ' \n' '  ' | grep -q "$2"; }
explains_mtls() {
    explained peerauthentication.spec.mode "Strict: the agent closes every connection that is not mutual TLS" &&
        explained peerauthentication.spec.portLevelMtls.port "a container port, not a Service port"
}
eventually "kubectl explain describes peerauthentication.spec.mode and .portLevelMtls.port" explains_mtls

# What the chart calls things, from its rendering.
render() { "$HELM" template "$RELEASE" "$CHART" -n "$SYSTEM_NS" --kube-version 1.29.0 --show-only "$1"; }
SA=$(render templates/serviceaccount.yaml | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["metadata"]["name"])')
render templates/configmap.yaml | python3 -c '
import sys, yaml
print(yaml.safe_load(sys.stdin)["data"]["inject.yaml"], end="")' >"$WORK/inject.yaml"
WEBHOOK=$(render templates/webhook.yaml | python3 -c '
import sys, yaml
print(*[d["metadata"]["name"] for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] == "MutatingWebhookConfiguration"])')
kubectl -n "$SYSTEM_NS" get serviceaccount "$SA" >/dev/null || fail "no ServiceAccount $SA"
kubectl get mutatingwebhookconfiguration "$WEBHOOK" >/dev/null || fail "no MutatingWebhookConfiguration $WEBHOOK"
ok "ServiceAccount $SYSTEM_NS/$SA and MutatingWebhookConfiguration $WEBHOOK exist"

# ---------------------------------------------------------------------------
step "RBAC: the control plane's ServiceAccount may do exactly what it needs"
AS=system:serviceaccount:$SYSTEM_NS:$SA
# can ALLOWED|DENIED ARGS...: kubectl auth can-i ARGS as the ServiceAccount.
can() {
    local want=$1 got
    shift
    got=$(kubectl auth can-i "$@" --as="$AS" 2>/dev/null) || true
    case "$want:$got" in
    allowed:yes | denied:no) ;;
    *) fail "can-i $* should be $want, the API server says '${got:-error}'" ;;
    esac
}
# review ALLOWED|DENIED GROUP RESOURCE SUBRESOURCE VERB: a SubjectAccessReview, for kinds
# the server does not serve (kubectl auth can-i drops the group of an unknown resource).
review() {
    local got
    got=$(kubectl create -o jsonpath='{.status.allowed}' -f - 2>&1 <<EOF
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: $AS
  groups: [system:serviceaccounts, "system:serviceaccounts:$SYSTEM_NS", system:authenticated]
  resourceAttributes: {group: $2, resource: $3, subresource: "$4", verb: $5}
EOF
    ) || true
    case "$1:$got" in
    allowed:true | denied:false) ;;
    *) fail "$5 $3/$4 in $2 should be $1, the API server says '${got:-error}'" ;;
    esac
}
for verb in list watch; do
    can allowed "$verb" services -A
    can allowed "$verb" pods -A
    can allowed "$verb" endpointslices.discovery.k8s.io -A
    for kind in resiliencepolicies ratelimitpolicies shardtopologies authorizationpolicies peerauthentications; do
        can allowed "$verb" "$kind.bulwark.io" -A
    done
    review allowed gateway.networking.k8s.io httproutes "" "$verb"
    review allowed gateway.networking.k8s.io grpcroutes "" "$verb"
done
for kind in httproutes grpcroutes; do
    review allowed gateway.networking.k8s.io "$kind" status patch
    review denied gateway.networking.k8s.io "$kind" "" patch
    review denied gateway.networking.k8s.io "$kind" "" update
done
for kind in resiliencepolicies ratelimitpolicies shardtopologies authorizationpolicies peerauthentications; do
    can allowed patch "$kind.bulwark.io" --subresource=status -n "$APP_NS"
    can denied patch "$kind.bulwark.io" -n "$APP_NS"
    can denied update "$kind.bulwark.io" -n "$APP_NS"
done
ok "list/watch services, pods, endpointslices, the policy kinds and Gateway API routes; patch of policy status only"
can allowed get "leases.coordination.k8s.io/$LEASE" -n "$SYSTEM_NS"
can allowed update "leases.coordination.k8s.io/$LEASE" -n "$SYSTEM_NS"
can allowed create leases.coordination.k8s.io -n "$SYSTEM_NS"
can denied update leases.coordination.k8s.io/other -n "$SYSTEM_NS"
can denied delete "leases.coordination.k8s.io/$LEASE" -n "$SYSTEM_NS"
for ns in kube-system kube-node-lease default; do
    can denied create leases.coordination.k8s.io -n "$ns"
    can denied update leases.coordination.k8s.io -n "$ns"
    can denied update "leases.coordination.k8s.io/$LEASE" -n "$ns"
done
ok "its own Lease in $SYSTEM_NS (get, update, create); no other Lease, none in kube-system, kube-node-lease, default"
can denied get secrets -A
can denied get secrets -n "$SYSTEM_NS"
can denied list secrets -A
can denied watch secrets -n "$SYSTEM_NS"
can denied create pods -n "$APP_NS"
can denied delete pods -n "$APP_NS"
can denied patch pods -n "$APP_NS"
can denied update services -n "$APP_NS"
can denied create endpointslices.discovery.k8s.io -n "$APP_NS"
can denied get configmaps -n "$SYSTEM_NS"
can denied create serviceaccounts/token -n "$SYSTEM_NS"
can denied '*' '*' -A
ok "no secrets, no pod create/delete/patch, no writes to services or endpointslices, no configmaps, no tokens"

# ---------------------------------------------------------------------------
step "the control plane as a local process, with the ServiceAccount's token"
TOKEN=$(kubectl -n "$SYSTEM_NS" create token "$SA" --duration=1h) || fail "kubectl create token $SA"
kubectl config view --minify --flatten -o json | python3 -c '
import json, sys
config = json.load(sys.stdin)
cluster = config["clusters"][0]["cluster"]
print(json.dumps({
    "apiVersion": "v1", "kind": "Config",
    "clusters": [{"name": "e2e", "cluster": {
        "server": cluster["server"],
        "certificate-authority-data": cluster["certificate-authority-data"]}}],
    "users": [{"name": "control-plane", "user": {"token": sys.argv[1]}}],
    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "control-plane"}}],
    "current-context": "e2e",
}))' "$TOKEN" >"$WORK/cp.kubeconfig"
if [ "$(KUBECONFIG=$WORK/cp.kubeconfig kubectl auth can-i list pods -A 2>/dev/null)" != yes ] ||
    [ "$(KUBECONFIG=$WORK/cp.kubeconfig kubectl auth can-i get secrets -A 2>/dev/null)" != no ]; then
    fail "the ServiceAccount's kubeconfig does not work"
fi
ok "a kubeconfig with the token of $AS"

# The webhook's CA and serving certificate for 127.0.0.1.
mkdir -p "$WORK/tls"
(
    cd "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=bulwark-e2e-local-ca -keyout ca.key -out ca.crt
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out tls.crt
) >"$WORK/openssl.txt" 2>&1 || fail "openssl: $(cat "$WORK/openssl.txt")"
ok "a CA and a serving certificate for IP:127.0.0.1"

# start_control_plane IDENTITY: the control plane as the pod would run it, but on loopback.
# KUBECONFIG is unset for it: only the token's kubeconfig may be used.
start_control_plane() {
    env -u KUBECONFIG "$TARGET/debug/bulwark-control-plane" \
        --source "kubernetes:$WORK/cp.kubeconfig" \
        --grpc-addr "$CP_GRPC" --admin-addr "$CP_ADMIN" \
        --lease-namespace "$SYSTEM_NS" --identity "$1" \
        --webhook-addr "127.0.0.1:$WEBHOOK_PORT" --webhook-cert-dir "$WORK/tls" \
        --webhook-config "$WORK/inject.yaml" >>"$WORK/control-plane-$1.log" 2>&1 &
    CP_PID=$!
    PIDS+=("$CP_PID")
}
start_control_plane e2e-local-1
eventually "the control plane (e2e-local-1) is ready" curl -fsS "http://$CP_ADMIN/ready"
lease_holder() { kubectl -n "$SYSTEM_NS" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}'; }
holder_is() { [ "$(lease_holder)" = "$1" ]; }
eventually "e2e-local-1 holds the Lease $SYSTEM_NS/$LEASE" holder_is e2e-local-1

# Point the chart's webhooks at the local control plane: url instead of service.
kubectl get mutatingwebhookconfiguration "$WEBHOOK" -o json | python3 -c '
import base64, json, sys
config = json.load(sys.stdin)
port, ca = sys.argv[1], open(sys.argv[2], "rb").read()
for hook in config["webhooks"]:
    path = hook["clientConfig"]["service"].get("path", "/")
    hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()}
    print(hook["name"], "->", hook["clientConfig"]["url"], file=sys.stderr)
print(json.dumps(config))' "$WEBHOOK_PORT" "$WORK/tls/ca.crt" 2>"$WORK/webhook-urls.txt" |
    kubectl replace -f - >/dev/null || fail "cannot point $WEBHOOK at 127.0.0.1:$WEBHOOK_PORT"
sed 's/^/    /' "$WORK/webhook-urls.txt"
ok "$WEBHOOK calls https://127.0.0.1:$WEBHOOK_PORT with our CA"

# ---------------------------------------------------------------------------
step "injection through the real admission chain"
# deployment NAMESPACE NAME [ANNOTATIONS_JSON]: a Deployment of one pod, labels app=NAME.
deployment() {
    local notes=${3:-"{}"}
    kubectl apply -n "$1" -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $2
spec:
  replicas: 1
  selector: {matchLabels: {app: $2}}
  template:
    metadata:
      labels: {app: $2}
      annotations: $notes
    spec:
      containers:
        - name: app
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          args: [netexec, --http-port=8080]
          ports: [{containerPort: 8080, name: http}]
EOF
}
# pod_of NAMESPACE APP: the name of the app's newest pod.
pod_of() {
    kubectl -n "$1" get pod -l "app=$2" --sort-by=.metadata.creationTimestamp \
        -o jsonpath='{.items[-1:].metadata.name}' 2>/dev/null
}
has_pod() { [ -n "$(pod_of "$1" "$2")" ]; }
# check_injected NAMESPACE APP: what the webhook put into the pod, in container mode (< 1.29).
check_injected() {
    kubectl -n "$1" get pod "$(pod_of "$1" "$2")" -o json | python3 -c '
import json, sys
pod = json.load(sys.stdin)
spec, notes = pod["spec"], pod["metadata"].get("annotations", {})
init = {c["name"]: c for c in spec.get("initContainers", [])}
containers = [c["name"] for c in spec["containers"]]
problems = []
if "bulwark.io/injected" not in notes:
    problems.append("no bulwark.io/injected annotation")
if "bulwark-init" not in init or "init" not in init["bulwark-init"].get("args", []) + init["bulwark-init"].get("command", []):
    problems.append(f"no bulwark-init container running bulwark-agent init: {list(init)}")
if containers[:1] != ["bulwark-agent"] or "app" not in containers:
    problems.append(f"containers are {containers}, want bulwark-agent first, then app")
elif "restartPolicy" in spec["containers"][0]:
    problems.append("the agent container has a restartPolicy")
else:
    hook = json.dumps(spec["containers"][0].get("lifecycle", {}).get("postStart", {}))
    if "wait-ready" not in hook:
        problems.append(f"the agent has no postStart wait-ready: {hook}")
if "bulwark-agent" in init:
    problems.append("the agent is a native sidecar on a server before 1.29")
if problems:
    sys.exit("; ".join(problems))
print(pod["metadata"]["name"], "containers:", containers, "init:", list(init), "injected:", notes["bulwark.io/injected"])
'
}

kubectl create namespace "$APP_NS" >/dev/null
deployment "$APP_NS" web '{"bulwark.io/inject": "enabled"}'
eventually "the controller manager made a web pod in $APP_NS" has_pod "$APP_NS" web
check_injected "$APP_NS" web || fail "the annotated pod was not injected as expected"
ok "the annotated Deployment's pod carries bulwark-init (bulwark-agent init) and the agent as first container with a postStart wait-ready (container mode, from the server's version)"
deployment "$APP_NS" plain
eventually "a pod of a plain Deployment is created" has_pod "$APP_NS" plain
if check_injected "$APP_NS" plain >/dev/null 2>&1; then fail "the plain pod in $APP_NS was injected"; fi
ok "a pod that does not ask is not injected"

kubectl create namespace "$LABELLED_NS" >/dev/null
kubectl label namespace "$LABELLED_NS" bulwark.io/inject=enabled >/dev/null
deployment "$LABELLED_NS" api
eventually "the controller manager made an api pod in $LABELLED_NS" has_pod "$LABELLED_NS" api
check_injected "$LABELLED_NS" api || fail "the pod in the labelled namespace was not injected"
ok "a plain Deployment in a namespace labelled bulwark.io/inject=enabled is injected"
deployment "$LABELLED_NS" opted-out '{"bulwark.io/inject": "disabled"}'
eventually "a pod annotated bulwark.io/inject: disabled is created there" has_pod "$LABELLED_NS" opted-out
if check_injected "$LABELLED_NS" opted-out >/dev/null 2>&1; then fail "the opted-out pod was injected"; fi
ok "the pod's bulwark.io/inject: disabled wins over the namespace label"

deployment "$APP_NS" bad '{"bulwark.io/inject": "enabled", "bulwark.io/skip-inbound-ports": "http"}'
rs_failure() {
    kubectl -n "$APP_NS" get rs -l app=bad \
        -o jsonpath='{.items[*].status.conditions[?(@.type=="ReplicaFailure")].message}'
}
denied_in_rs() { grep -q '"http" is not a port' <<<"$(rs_failure)"; }
eventually "the ReplicaSet of skip-inbound-ports: http reports the webhook's denial" denied_in_rs
echo "    $(rs_failure)"
has_pod "$APP_NS" bad && fail "a pod of the denied Deployment exists"
if kubectl apply -n "$APP_NS" -f - >"$WORK/denied.txt" 2>&1 <<EOF; then
apiVersion: v1
kind: Pod
metadata:
  name: bad-direct
  annotations: {bulwark.io/inject: enabled, bulwark.io/skip-inbound-ports: http}
spec:
  containers: [{name: app, image: registry.k8s.io/pause:3.9}]
EOF
    fail "a Pod with skip-inbound-ports: http was admitted"
fi
if ! grep -q 'bulwark.io/skip-inbound-ports' "$WORK/denied.txt" || ! grep -q 'denied the request' "$WORK/denied.txt"; then
    fail "kubectl's error does not give the reason: $(cat "$WORK/denied.txt")"
fi
ok "kubectl create of such a Pod fails: $(tr -d '\n' <"$WORK/denied.txt")"

# ---------------------------------------------------------------------------
step "an agent for the pending web pod, and a Service backed by a manual EndpointSlice"
# Pods get no IPs here, so `reviews` has no selector and a hand-made EndpointSlice. The
# API server refuses loopback addresses in an EndpointSlice, so these are TEST-NET-1
# (192.0.2.0/24): nothing is ever sent to them, only the agent's config is read.
ENDPOINTS=(192.0.2.11 192.0.2.12)
endpoints() {
    local a
    printf 'apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: %s}\n' "$APP_NS"
    printf 'spec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n'
    printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n'
    printf 'metadata:\n  name: reviews-manual\n  namespace: %s\n' "$APP_NS"
    printf '  labels: {kubernetes.io/service-name: reviews, endpointslice.kubernetes.io/managed-by: e2e-local.bulwark.io}\n'
    printf 'addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n'
    for a in "${ENDPOINTS[@]}"; do printf '  - addresses: ["%s"]\n    conditions: {ready: true}\n' "$a"; done
}
endpoints | kubectl apply -f - >"$WORK/slice.txt" 2>&1 || fail "the EndpointSlice: $(cat "$WORK/slice.txt")"
ok "Service reviews (no selector) with a manual EndpointSlice of ${ENDPOINTS[*]}"
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $APP_NS}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: $APP_NS}
spec:
  selector: {app: orders}
  ports: [{name: http, port: 80, targetPort: 8080}]
EOF

WEB_POD=$(pod_of "$APP_NS" web)
LABELS=()
while read -r label; do LABELS+=(--label "$label"); done < <(
    kubectl -n "$APP_NS" get pod "$WEB_POD" -o json |
        python3 -c 'import json, sys; [print(f"{k}={v}") for k, v in json.load(sys.stdin)["metadata"]["labels"].items()]'
)
"$TARGET/debug/bulwark-agent" --control-plane "http://$CP_GRPC" \
    --namespace "$APP_NS" --pod-name "$WEB_POD" --service-account default "${LABELS[@]}" \
    --outbound-addr "127.0.0.1:$AGENT_OUT_PORT" --admin-addr "$AGENT_ADMIN" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
eventually "the agent of $APP_NS/$WEB_POD (${LABELS[*]}) is ready" curl -fsS "http://$AGENT_ADMIN/ready"

# agent_view: "ATTEMPTS ENDPOINTS" the agent has for reviews.APP_NS:80.
agent_view() {
    curl -fsS "http://$AGENT_ADMIN/config" | python3 -c '
import json, sys
config = json.load(sys.stdin)["config"]
for d in config.get("destinations", []):
    if d["name"] == sys.argv[1]:
        print((d.get("retry") or {}).get("attempts"), len(d.get("endpoints", [])))
' "reviews.$APP_NS:80"
}
agent_has() { [ "$(agent_view)" = "$1" ]; }
eventually "the agent's /config has reviews.$APP_NS:80 with its 2 endpoints, no retry policy" agent_has "None 2"
agent_addresses() {
    curl -fsS "http://$AGENT_ADMIN/config" | python3 -c '
import json, sys
for d in json.load(sys.stdin)["config"].get("destinations", []):
    if d["name"] == sys.argv[1]:
        print(" ".join(sorted(str(e.get("address", e)) for e in d.get("endpoints", []))))
' "reviews.$APP_NS:80"
}
grep -q "192.0.2.11:8080.*192.0.2.12:8080" <<<"$(agent_addresses)" || fail "the agent's endpoints of reviews: $(agent_addresses)"
ok "its endpoints are the EndpointSlice's: $(agent_addresses)"

# ---------------------------------------------------------------------------
step "policies: status conditions and what the agent receives"
# condition KIND NAME: STATUS/REASON/OBSERVED_GENERATION of the Accepted condition.
condition() {
    kubectl -n "$APP_NS" get "$1" "$2" -o \
        jsonpath='{range .status.conditions[?(@.type=="Accepted")]}{.status}/{.reason}/{.observedGeneration}{end}'
}
condition_is() { [ "$(condition "$1" "$2")" = "$3" ]; }
message() {
    kubectl -n "$APP_NS" get "$1" "$2" -o jsonpath='{.status.conditions[?(@.type=="Accepted")].message}'
}
# rp NAME SERVICE SPEC_LINES: a ResiliencePolicy on SERVICE with extra spec lines.
rp() {
    cat <<EOF
apiVersion: bulwark.io/v1alpha1
kind: ResiliencePolicy
metadata:
  name: $1
  namespace: $APP_NS
spec:
  targetRefs: [{kind: Service, name: $2}]
$3
EOF
}
# refused WHAT PATTERN YAML: kubectl apply must fail with an error matching PATTERN.
refused() {
    if kubectl apply -f - >"$WORK/refused.txt" 2>&1 <<<"$3"; then
        fail "$1 was admitted"
    fi
    grep -q -- "$2" "$WORK/refused.txt" || fail "$1: unexpected error: $(cat "$WORK/refused.txt")"
    ok "$1 refused: $(grep -o -- "$2.*" "$WORK/refused.txt" | head -n 1)"
}

rp reviews reviews "  retry: {attempts: 3}" | kubectl apply -f - >/dev/null
eventually "reviews is Accepted (generation 1)" condition_is rp reviews True/Accepted/1
eventually "the agent retries reviews 3 times" agent_has "3 2"

refused "retry.attempts: 11 (schema)" "spec.retry.attempts" "$(rp reviews reviews '  retry: {attempts: 11}')"
refused "retry.attempts: -1 (schema)" "spec.retry.attempts" "$(rp reviews reviews '  retry: {attempts: -1}')"
refused "perTryTimeout: 5parsecs (schema)" "spec.retry.perTryTimeout" \
    "$(rp reviews reviews '  retry: {attempts: 3, perTryTimeout: 5parsecs}')"
if rp cel reviews "  retry: {attempts: 3, backoff: {base: 2s, max: 1s}}" |
    kubectl apply -f - >"$WORK/cel.txt" 2>&1; then
    echo "    note: this API server does not run CEL rules; the control plane reports them"
    eventually "backoff base > max is Invalid in status" condition_is rp cel False/Invalid/1
    grep -q "spec.retry.backoff" <<<"$(message rp cel)" || fail "the Invalid message does not name spec.retry.backoff: $(message rp cel)"
    kubectl -n "$APP_NS" delete rp cel >/dev/null
    CEL="off (the control plane's status reports what CEL rules catch)"
else
    grep -q "base must not exceed max" "$WORK/cel.txt" || fail "unexpected CEL error: $(cat "$WORK/cel.txt")"
    ok "backoff base > max refused by CEL: $(grep -o 'spec.retry.backoff.*' "$WORK/cel.txt")"
    refused "ConsistentHash without hashOn (CEL)" "hashOn is required for ConsistentHash" \
        "$(rp cel reviews '  loadBalancer: {strategy: ConsistentHash}')"
    CEL=on
fi

rp reviews reviews "  retry: {attempts: 3, grpcCodes: [no-such-code]}" | kubectl apply -f - >/dev/null
eventually "grpcCodes: [no-such-code] is Invalid (generation 2)" condition_is rp reviews False/Invalid/2
grep -q 'spec.retry.grpcCodes\[0\]' <<<"$(message rp reviews)" ||
    fail "the Invalid message does not name spec.retry.grpcCodes[0]: $(message rp reviews)"
ok "the message names the field: $(message rp reviews)"
agent_has "3 2" || fail "the agent lost the last accepted version: $(agent_view)"
ok "the agent keeps the last good version (3 attempts)"
rp reviews reviews "  retry: {attempts: 3}" | kubectl apply -f - >/dev/null
eventually "back to valid: Accepted (generation 3)" condition_is rp reviews True/Accepted/3

sleep 1 # creation timestamps have one-second resolution
rp reviews-late reviews "  retry: {attempts: 7}" | kubectl apply -f - >/dev/null
eventually "a younger policy on reviews is Conflicted" condition_is rp reviews-late False/Conflicted/1
grep -q "$APP_NS/reviews takes precedence" <<<"$(message rp reviews-late)" ||
    fail "the Conflicted message does not name the winner: $(message rp reviews-late)"
ok "the message names the winner: $(message rp reviews-late)"
agent_has "3 2" || fail "the agent follows the losing policy: $(agent_view)"

rp ghost ghost "  retry: {attempts: 2}" | kubectl apply -f - >/dev/null
eventually "a policy for a missing Service is TargetNotFound" condition_is rp ghost False/TargetNotFound/1
grep -q ghost <<<"$(message rp ghost)" || fail "the TargetNotFound message does not name the Service: $(message rp ghost)"
ok "the message names the Service: $(message rp ghost)"

kubectl apply -f - >/dev/null <<EOF
apiVersion: bulwark.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: web, namespace: $APP_NS}
spec:
  targetRefs: [{kind: Service, name: web}]
  limits:
    - name: per-tenant
      key: {type: Header, header: x-tenant-id}
      rate: {requests: 20, per: 1s}
      burst: 10
    - name: total
      key: {type: None}
      rate: {requests: 200, per: 1s}
      burst: 100
---
apiVersion: bulwark.io/v1alpha1
kind: ShardTopology
metadata: {name: orders, namespace: $APP_NS}
spec:
  targetRefs: [{kind: Service, name: orders}]
  key: {type: Header, name: x-customer}
  missingKey: {action: Reject}
  strategy:
    type: Range
    ranges:
      - {end: m, shard: a}
      - {start: m, shard: b}
  shards:
    - name: a
      primary: {matchLabels: {shard: a, role: primary}}
      replicas: {matchLabels: {shard: a, role: replica}}
    - name: b
      primary: {matchLabels: {shard: b, role: primary}}
      replicas: {matchLabels: {shard: b, role: replica}}
  reads: {methods: [GET, HEAD, OPTIONS]}
  readYourWrites: {window: 5s, clientHeader: x-session}
EOF
eventually "RateLimitPolicy web is Accepted" condition_is rlp web True/Accepted/1
eventually "ShardTopology orders is Accepted" condition_is st orders True/Accepted/1
# agent_json PYTHON_EXPRESSION: evaluates it on the agent's config (`config`), prints it.
agent_json() {
    curl -fsS "http://$AGENT_ADMIN/config" | python3 -c '
import json, sys
config = json.load(sys.stdin)["config"]
dest = {d["name"]: d for d in config.get("destinations", [])}
print(eval(sys.argv[1]))' "$1"
}
limits_reach_agent() {
    [ "$(agent_json '[(l["name"], l["policy"]) for l in config.get("inbound", {}).get("rateLimits", [])]')" = \
        "[('per-tenant', '$APP_NS/web'), ('total', '$APP_NS/web')]" ]
}
eventually "the web pod's agent enforces both limits inbound (its labels match Service web)" limits_reach_agent
topology_reaches_agent() {
    [ "$(agent_json '[s["name"] for s in ((dest.get("orders.'"$APP_NS"':80") or {}).get("shardTopology") or {}).get("shards", [])]')" = "['a', 'b']" ]
}
eventually "the agent routes orders.$APP_NS:80 by the topology's shards a and b" topology_reaches_agent

kubectl -n "$APP_NS" patch rp reviews --type merge -p '{"spec":{"retry":{"attempts":5}}}' >/dev/null
eventually "kubectl patch: the agent retries reviews 5 times" agent_has "5 2"
eventually "the patched generation 4 is Accepted" condition_is rp reviews True/Accepted/4
kubectl -n "$APP_NS" delete rp reviews >/dev/null
eventually "delete reviews: the younger policy takes over (7 attempts)" agent_has "7 2"
eventually "reviews-late is Accepted" condition_is rp reviews-late True/Accepted/1
kubectl -n "$APP_NS" delete rp reviews-late >/dev/null
eventually "delete reviews-late: the agent drops the retry policy" agent_has "None 2"
kubectl get bulwark -n "$APP_NS"

# ---------------------------------------------------------------------------
step "PeerAuthentication: status, precedence, conflicts and refusals"
# pa NAME SPEC_LINES: a PeerAuthentication in APP_NS.
pa() {
    cat <<EOF
apiVersion: bulwark.io/v1alpha1
kind: PeerAuthentication
metadata:
  name: $1
  namespace: $APP_NS
spec:
$2
EOF
}
pa default "  mode: Strict" | kubectl apply -f - >/dev/null
eventually "a namespace-wide Strict PeerAuthentication is Accepted" condition_is peerauthn default True/Accepted/1
[ "$(kubectl -n "$APP_NS" get peerauthn default -o jsonpath='{.spec.mode}')" = Strict ] ||
    fail "the API server did not keep mode: Strict"
pa web "  selector: {matchLabels: {app: web}}
  portLevelMtls: [{port: 8080, mode: Strict}]" | kubectl apply -f - >/dev/null
eventually "a selector PeerAuthentication for app=web is Accepted (no conflict with the namespace-wide one)" \
    condition_is peerauthn web True/Accepted/1
[ "$(kubectl -n "$APP_NS" get peerauthn web -o jsonpath='{.spec.mode}')" = Permissive ] ||
    fail "the API server did not default mode to Permissive"
ok "the API server defaults mode to Permissive"
# agent_mtls: "SOURCE MODE PORT=MODE,..." of the agent's inbound mutual-TLS mode, or
# "absent" when this agent build does not show one in /config.
agent_mtls() {
    curl -fsS "http://$AGENT_ADMIN/config" | python3 -c '
import json, sys
p = json.load(sys.stdin)["config"].get("inbound", {}).get("peerAuthentication")
if p is None:
    print("absent")
else:
    ports = ",".join("%s=%s" % (x["port"], x["mode"]) for x in p.get("ports", []))
    print(p["source"], p["mode"], ports)
'
}
mtls_is() { [ "$(agent_mtls)" = "$1" ]; }
if [ "$(agent_mtls)" = absent ]; then
    echo "    note: this agent's /config shows no inbound peerAuthentication; the agent's view is not checked"
    AGENT_MTLS=
else
    AGENT_MTLS=1
    eventually "the web pod's agent follows the selector policy over the namespace-wide one" \
        mtls_is "$APP_NS/web Permissive 8080=Strict"
fi

sleep 1 # creation timestamps have one-second resolution
pa late "  mode: Permissive" | kubectl apply -f - >/dev/null
eventually "a younger namespace-wide PeerAuthentication is Conflicted" condition_is peerauthn late False/Conflicted/1
grep -q "$APP_NS/default takes precedence on every pod of namespace $APP_NS" <<<"$(message peerauthn late)" ||
    fail "the Conflicted message does not name the winner: $(message peerauthn late)"
ok "the message names the winner: $(message peerauthn late)"
pa web-late "  selector: {matchLabels: {app: web}}
  mode: Strict" | kubectl apply -f - >/dev/null
eventually "a younger selector PeerAuthentication on the same pod (app=web) is Conflicted" \
    condition_is peerauthn web-late False/Conflicted/1
grep -q "$APP_NS/web takes precedence on the pods both select" <<<"$(message peerauthn web-late)" ||
    fail "the Conflicted message does not name the winner: $(message peerauthn web-late)"
ok "the message names the winner: $(message peerauthn web-late)"
kubectl -n "$APP_NS" delete peerauthn web >/dev/null
eventually "delete web: web-late takes over and is Accepted" condition_is peerauthn web-late True/Accepted/1
if [ -n "$AGENT_MTLS" ]; then
    eventually "the agent follows web-late (Strict)" mtls_is "$APP_NS/web-late Strict "
fi

refused "mode: Disabled (schema)" "spec.mode" "$(pa bad '  mode: Disabled')"
refused "portLevelMtls port 70000 (schema)" "spec.portLevelMtls\[0\].port" \
    "$(pa bad '  portLevelMtls: [{port: 70000, mode: Strict}]')"
DUPLICATE_PORTS="  portLevelMtls: [{port: 8080, mode: Strict}, {port: 8080, mode: Permissive}]"
if [ "$CEL" = on ]; then
    refused "a port given twice in portLevelMtls (CEL)" "each port may appear once" "$(pa bad "$DUPLICATE_PORTS")"
    refused "selector without matchLabels (CEL)" "selector needs matchLabels" "$(pa bad '  selector: {}')"
    refused "a port entry without mode (CEL)" "mode is required" "$(pa bad '  portLevelMtls: [{port: 8080}]')"
else
    pa bad "$DUPLICATE_PORTS" | kubectl apply -f - >/dev/null
    eventually "a port given twice is Invalid in status (CEL off)" condition_is peerauthn bad False/Invalid/1
    grep -q 'spec.portLevelMtls\[1\].port' <<<"$(message peerauthn bad)" ||
        fail "the Invalid message does not name spec.portLevelMtls[1].port: $(message peerauthn bad)"
    ok "the message names the field: $(message peerauthn bad)"
    kubectl -n "$APP_NS" delete peerauthn bad >/dev/null
fi
columns=$(kubectl -n "$APP_NS" get peerauthn -o wide 2>&1 | sed -n 1p)
for column in MODE SELECTOR ACCEPTED REASON AGE; do
    grep -qw "$column" <<<"$columns" || fail "kubectl get peerauthn -o wide lacks $column: $columns"
done
ok "kubectl get peerauthn -o wide has the columns $(echo $columns)"
kubectl -n "$APP_NS" get peerauthn -o wide
kubectl -n "$APP_NS" delete peerauthn --all >/dev/null
if [ -n "$AGENT_MTLS" ]; then
    eventually "with every PeerAuthentication deleted the agent gets none" mtls_is " Permissive "
fi

# ---------------------------------------------------------------------------
step "restart the control plane with another identity"
rp reviews reviews "  retry: {attempts: 2}" | kubectl apply -f - >/dev/null
eventually "a new reviews is Accepted by e2e-local-1" condition_is rp reviews True/Accepted/1
eventually "the agent retries reviews twice" agent_has "2 2"
stop "$CP_PID"
not_holder() { ! holder_is "$1"; }
if grep -q "released the status lease" "$WORK/control-plane-e2e-local-1.log"; then
    ok "e2e-local-1 stopped (SIGTERM) and released the Lease (holder now '$(lease_holder)')"
else
    echo "    note: e2e-local-1 did not log that it released the Lease; waiting for it to expire"
fi
eventually "e2e-local-1 no longer holds the Lease" not_holder e2e-local-1
agent_has "2 2" || fail "the agent lost its config while the control plane was away: $(agent_view)"
ok "the agent keeps its config while the control plane is away"
start_control_plane e2e-local-2
eventually "the control plane (e2e-local-2) is ready" curl -fsS "http://$CP_ADMIN/ready"
eventually "e2e-local-2 holds the Lease" holder_is e2e-local-2
rp reviews reviews "  retry: {attempts: 2, grpcCodes: [no-such-code]}" | kubectl apply -f - >/dev/null
eventually "generation 2, applied after the restart, is Invalid (written by e2e-local-2)" \
    condition_is rp reviews False/Invalid/2
rp reviews reviews "  retry: {attempts: 4}" | kubectl apply -f - >/dev/null
eventually "generation 3 reaches the agent through the new process" agent_has "4 2"
eventually "generation 3 is Accepted" condition_is rp reviews True/Accepted/3

# ---------------------------------------------------------------------------
# issue 15: workload identity as the chart turns it on. The chart's issuer Secret, a
# control plane run with the chart's identity flags (the Secret's files where the pod
# mounts them), the trust-anchor ConfigMaps it writes, real TokenReviews, an agent with a
# projected-style token, and the webhook's identity volume in real pods.
step "workload identity from the chart: issuer Secret, TLS, anchors, TokenReview"
ID_RELEASE=bulwark-idcheck
ID_NS=bulwark-e2e-identity
ID_PIDS=()
identity_cleanup() {
    set +e
    for pid in "${ID_PIDS[@]}"; do stop "$pid"; done
    "$HELM" uninstall "$ID_RELEASE" -n "$ID_NS" >/dev/null 2>&1
    kubectl delete namespace "$ID_NS" --ignore-not-found --wait=false >/dev/null 2>&1
    # The trust-anchor ConfigMaps the control plane wrote into every namespace.
    kubectl delete configmap -A -l app.kubernetes.io/managed-by=bulwark-control-plane \
        --ignore-not-found >/dev/null 2>&1
}
# Ours first, keeping the script's exit status for the main cleanup.
trap 'status=$?; identity_cleanup; (exit $status); cleanup' EXIT
kubectl delete namespace "$ID_NS" --ignore-not-found --wait=false >/dev/null
gone "$ID_NS"

ISSUER=$(render templates/identity.yaml | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["metadata"]["name"])')
# secret_file SECRET KEY: the decoded value of KEY in SECRET (in SYSTEM_NS).
secret_file() {
    kubectl -n "${3:-$SYSTEM_NS}" get secret "$1" -o json |
        python3 -c 'import base64, json, sys; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["data"][sys.argv[1]]))' "$2"
}
[ "$(kubectl -n "$SYSTEM_NS" get secret "$ISSUER" -o jsonpath='{.type}')" = kubernetes.io/tls ] ||
    fail "no kubernetes.io/tls Secret $SYSTEM_NS/$ISSUER"
mkdir -p "$WORK/identity"
for key in tls.crt tls.key ca.crt; do
    secret_file "$ISSUER" "$key" >"$WORK/identity/$key" || fail "the issuer Secret lacks $key"
done
openssl x509 -in "$WORK/identity/ca.crt" -noout -text | grep -q "CA:TRUE" || fail "the issuer's ca.crt is not a CA"
[ "$(openssl pkey -in "$WORK/identity/tls.key" -pubout)" = "$(openssl x509 -in "$WORK/identity/tls.crt" -noout -pubkey)" ] ||
    fail "the issuer's tls.key is not the key of its tls.crt"
ok "the chart made the issuer Secret $SYSTEM_NS/$ISSUER (kubernetes.io/tls; $(openssl x509 -in "$WORK/identity/ca.crt" -noout -subject), a CA, its key matches)"

# helm install and upgrade keep the issuer: a release of a copy of the chart whose
# kubeVersion admits this server (its webhooks Ignore failures, and it goes at the end).
cp -r "$CHART" "$WORK/chart-copy"
sed -i 's/^kubeVersion:.*/kubeVersion: ">=1.24.0-0"/' "$WORK/chart-copy/Chart.yaml"
kubectl create namespace "$ID_NS" >/dev/null
"$HELM" install "$ID_RELEASE" "$WORK/chart-copy" -n "$ID_NS" --skip-crds \
    --set webhook.failurePolicy=Ignore >"$WORK/id-install.txt" 2>&1 || fail "helm install: $(cat "$WORK/id-install.txt")"
grep -q "Workload identity is on" "$WORK/id-install.txt" || fail "helm install's notes do not say identity is on"
ID_ISSUER=$ID_RELEASE-identity-issuer # the release name holds "bulwark": the full name is the release
first=$(secret_file "$ID_ISSUER" tls.crt "$ID_NS" | sha256sum) || fail "helm install made no $ID_NS/$ID_ISSUER"
"$HELM" upgrade "$ID_RELEASE" "$WORK/chart-copy" -n "$ID_NS" --skip-crds --reuse-values \
    --set identity.certLifetime=12h >"$WORK/id-upgrade.txt" 2>&1 || fail "helm upgrade: $(cat "$WORK/id-upgrade.txt")"
[ "$(secret_file "$ID_ISSUER" tls.crt "$ID_NS" | sha256sum)" = "$first" ] || fail "helm upgrade re-keyed the issuer"
grep -q -- "--cert-lifetime=12h" <<<"$(kubectl -n "$ID_NS" get deployment "$ID_RELEASE-control-plane" -o jsonpath='{.spec.template.spec.containers[0].args}')" ||
    fail "the upgrade did not reach the Deployment"
ok "helm install made $ID_NS/$ID_ISSUER; helm upgrade kept it (lookup) and changed the Deployment's flags"
"$HELM" uninstall "$ID_RELEASE" -n "$ID_NS" >/dev/null || fail "helm uninstall $ID_RELEASE"
kubectl delete namespace "$ID_NS" --wait=false >/dev/null

AS=system:serviceaccount:$SYSTEM_NS:$SA
can allowed create tokenreviews.authentication.k8s.io
can allowed list namespaces
can allowed watch namespaces
can allowed create configmaps -n "$APP_NS"
can allowed patch configmaps/bulwark-trust-anchors -n "$APP_NS"
can denied patch configmaps/other -n "$APP_NS"
can denied update configmaps/bulwark-trust-anchors -n "$APP_NS"
can denied get configmaps/bulwark-trust-anchors -n "$APP_NS"
can denied list configmaps -A
can denied delete configmaps/bulwark-trust-anchors -n "$APP_NS"
ok "identity's RBAC: create tokenreviews, list/watch namespaces, create configmaps and patch bulwark-trust-anchors only; no configmap reads"

# The control plane with the chart's identity flags; the issuer folder is the Secret's
# files, as the pod mounts them. It also answers on 127.0.0.1, which the agent dials here.
mapfile -t ID_FLAGS < <(render templates/deployment.yaml | python3 -c '
import sys, yaml
args = yaml.safe_load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]["args"]
for a in args:
    if a.startswith(("--identity-dir=", "--trust-domain=", "--cert-lifetime=", "--tls-name=")):
        print(a)')
[ "${#ID_FLAGS[@]}" -eq 4 ] || fail "the chart's Deployment lacks identity flags: ${ID_FLAGS[*]}"
TLS_NAMES=$(printf '%s\n' "${ID_FLAGS[@]}" | sed -n 's/^--tls-name=//p')
SERVICE_NAME=$(tr ',' '\n' <<<"$TLS_NAMES" | grep '\.svc$')
ID_FLAGS=("${ID_FLAGS[@]/#--identity-dir=*/--identity-dir=$WORK/identity}")
echo "    the chart's identity flags: ${ID_FLAGS[*]}"
stop "$CP_PID"
env -u KUBECONFIG "$TARGET/debug/bulwark-control-plane" \
    --source "kubernetes:$WORK/cp.kubeconfig" \
    --grpc-addr "$CP_GRPC" --admin-addr "$CP_ADMIN" \
    --lease-namespace "$SYSTEM_NS" --identity e2e-local-identity \
    --webhook-addr "127.0.0.1:$WEBHOOK_PORT" --webhook-cert-dir "$WORK/tls" \
    --webhook-config "$WORK/inject.yaml" "${ID_FLAGS[@]}" --tls-name 127.0.0.1 \
    >>"$WORK/control-plane-identity.log" 2>&1 &
CP_PID=$!
PIDS+=("$CP_PID")
ID_PIDS+=("$CP_PID")
eventually "the control plane with identity is ready" curl -fsS "http://$CP_ADMIN/ready"
serves_tls() {
    openssl s_client -connect "$CP_GRPC" -servername "$SERVICE_NAME" -verify_hostname "$SERVICE_NAME" \
        -CAfile "$WORK/identity/ca.crt" -verify_return_error -alpn h2 </dev/null 2>&1 |
        grep -q "Verify return code: 0 (ok)"
}
eventually "its gRPC port serves TLS that verifies against the issuer's ca.crt as $SERVICE_NAME" serves_tls
curl -fsS -o /dev/null --max-time 5 "http://$CP_GRPC/" 2>/dev/null && fail "the gRPC port answers plaintext HTTP"
ok "and no plaintext"

# anchors_in NAMESPACE: the trust-anchor ConfigMap's ca.crt there.
anchors_in() { kubectl -n "$1" get configmap bulwark-trust-anchors -o jsonpath='{.data.ca\.crt}' 2>/dev/null; }
anchors_are() { [ "$(anchors_in "$1")" = "$(cat "$2")" ]; }
for ns in "$APP_NS" "$LABELLED_NS" default; do
    eventually "ConfigMap $ns/bulwark-trust-anchors holds the issuer's ca.crt" anchors_are "$ns" "$WORK/identity/ca.crt"
done
for ns in "$SYSTEM_NS" kube-system; do
    [ -z "$(anchors_in "$ns")" ] || fail "the control plane wrote trust anchors into $ns"
done
ok "none in $SYSTEM_NS or kube-system"

# A real TokenReview, by the control plane's ServiceAccount, of a token for audience
# bulwark bound to the pending web pod.
WEB_UID=$(kubectl -n "$APP_NS" get pod "$WEB_POD" -o jsonpath='{.metadata.uid}')
kubectl -n "$APP_NS" create token default --audience bulwark --duration 1h \
    --bound-object-kind Pod --bound-object-name "$WEB_POD" --bound-object-uid "$WEB_UID" >"$WORK/web.token" ||
    fail "kubectl create token default --audience bulwark"
# token_review TOKEN_FILE: the review's status as the control plane's ServiceAccount gets it.
token_review() {
    KUBECONFIG=$WORK/cp.kubeconfig kubectl create -o json -f - <<EOF | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["status"], sort_keys=True))'
apiVersion: authentication.k8s.io/v1
kind: TokenReview
spec: {token: "$(cat "$1")", audiences: [bulwark]}
EOF
}
REVIEW=$(token_review "$WORK/web.token") || fail "the control plane's ServiceAccount cannot create a TokenReview"
python3 -c '
import json, sys
s = json.loads(sys.argv[1])
want = {"authenticated": True, "audiences": ["bulwark"]}
assert all(s.get(k) == v for k, v in want.items()), s
assert s["user"]["username"] == "system:serviceaccount:%s:default" % sys.argv[2], s
assert s["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [sys.argv[3]], s
' "$REVIEW" "$APP_NS" "$WEB_POD" || fail "unexpected TokenReview: $REVIEW"
ok "TokenReview: $REVIEW"
kubectl -n "$APP_NS" create token default >"$WORK/api.token"
grep -q "is invalid for the target audiences" <<<"$(token_review "$WORK/api.token")" ||
    fail "a token for the API server passes for audience bulwark: $(token_review "$WORK/api.token")"
ok "a token without audience bulwark is not authenticated for it: $(token_review "$WORK/api.token")"

# agent_with TOKEN_FILE OUT_PORT ADMIN: an agent of the web pod over TLS, its anchors
# from the namespace's ConfigMap (as the pod mounts them).
anchors_in "$APP_NS" >"$WORK/agent-ca.crt"
agent_with() {
    "$TARGET/debug/bulwark-agent" --control-plane "https://127.0.0.1:$CP_GRPC_PORT" \
        --control-plane-ca "$WORK/agent-ca.crt" --token-file "$1" \
        --namespace "$APP_NS" --pod-name "$WEB_POD" --service-account default "${LABELS[@]}" \
        --outbound-addr "127.0.0.1:$2" --admin-addr "$3" >>"$WORK/agent-$(basename "$1").log" 2>&1 &
    PIDS+=($!)
    ID_PIDS+=($!)
}
read -r ID_OUT ID_ADMIN_PORT BAD_OUT BAD_ADMIN_PORT <<<"$(free_ports 4)"
agent_with "$WORK/web.token" "$ID_OUT" "127.0.0.1:$ID_ADMIN_PORT"
# identity_of ADMIN: "SPIFFE_ID ENDPOINTS_OF_REVIEWS" from the agent's /config.
identity_of() {
    curl -fsS "http://$1/config" | python3 -c '
import json, sys
c = json.load(sys.stdin)
dest = [d for d in (c.get("config") or {}).get("destinations", []) if d["name"] == sys.argv[1]]
print((c.get("identity") or {}).get("spiffeId"), len(dest[0].get("endpoints", [])) if dest else 0)
' "reviews.$APP_NS:80"
}
identity_is() { [ "$(identity_of "$1")" = "$2" ]; }
eventually "the agent with the web pod's token gets spiffe://cluster.local/ns/$APP_NS/sa/default and its config" \
    identity_is "127.0.0.1:$ID_ADMIN_PORT" "spiffe://cluster.local/ns/$APP_NS/sa/default 2"
eventually "and is ready" curl -fsS "http://127.0.0.1:$ID_ADMIN_PORT/ready"
printf 'forged.%s.token' "$(openssl rand -hex 8)" >"$WORK/forged.token"
agent_with "$WORK/forged.token" "$BAD_OUT" "127.0.0.1:$BAD_ADMIN_PORT"
refused_error() {
    curl -fsS "http://127.0.0.1:$BAD_ADMIN_PORT/config" | python3 -c '
import json, sys
print((json.load(sys.stdin).get("identity") or {}).get("lastError") or "")' | grep -q "Unauthenticated"
}
eventually "an agent with a forged token is refused (Unauthenticated)" refused_error
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$BAD_ADMIN_PORT/ready")" = 503 ] ||
    fail "the agent with a forged token is ready"
[ "$(identity_of "127.0.0.1:$BAD_ADMIN_PORT")" = "None 0" ] || fail "the forged agent got something: $(identity_of "127.0.0.1:$BAD_ADMIN_PORT")"
ok "and gets neither certificate nor config"
grep -q "the token proves nothing" "$WORK/control-plane-identity.log" || fail "the control plane did not log the refusal"
if grep -q -e "PRIVATE KEY" -e "$(cat "$WORK/web.token")" "$WORK/control-plane-identity.log" "$WORK"/agent-*.log; then
    fail "a private key or a token reached a log"
fi
ok "no private key and no token in the logs"

# The webhook's patch: pods made through the real admission chain carry the token
# volume, and the API server took it (a projected token of at least 10 minutes).
# check_identity NAMESPACE POD: what identity put into the pod.
check_identity() {
    kubectl -n "$1" get pod "$2" -o json | python3 -c '
import json, sys
pod = json.load(sys.stdin)
spec = pod["spec"]
vol = {v["name"]: v for v in spec.get("volumes", [])}.get("bulwark-identity")
problems = []
if not vol:
    sys.exit("no bulwark-identity volume")
sources = vol["projected"]["sources"]
token = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
cm = [s["configMap"] for s in sources if "configMap" in s]
if token != [{"audience": "bulwark", "expirationSeconds": 3600, "path": "token"}]:
    problems.append(f"token projection {token}")
if not cm or cm[0]["name"] != "bulwark-trust-anchors":
    problems.append(f"anchors projection {cm}")
agent = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "bulwark-agent"][0]
mounts = [m for m in agent.get("volumeMounts", []) if m["name"] == "bulwark-identity"]
if [(m["mountPath"], m.get("readOnly")) for m in mounts] != [("/var/run/secrets/bulwark.io/serviceaccount", True)]:
    problems.append("agent mounts %s" % agent.get("volumeMounts"))
env = {e["name"]: e.get("value") for e in agent.get("env", [])}
if not env.get("BULWARK_CONTROL_PLANE", "").startswith("https://"):
    problems.append("control plane %s" % env.get("BULWARK_CONTROL_PLANE"))
if env.get("BULWARK_TOKEN_FILE") != "/var/run/secrets/bulwark.io/serviceaccount/token":
    problems.append("BULWARK_TOKEN_FILE")
if env.get("BULWARK_CONTROL_PLANE_CA") != "/var/run/secrets/bulwark.io/serviceaccount/ca.crt":
    problems.append("BULWARK_CONTROL_PLANE_CA")
for c in spec["containers"] + spec.get("initContainers", []):
    if c["name"] != "bulwark-agent" and any(m["name"] == "bulwark-identity" for m in c.get("volumeMounts", [])):
        problems.append("%s mounts the token" % c["name"])
if problems:
    sys.exit("; ".join(problems))
print(pod["metadata"]["name"], "agent env", env["BULWARK_CONTROL_PLANE"])
'
}
check_identity "$APP_NS" "$WEB_POD" || fail "the web pod lacks identity"
deployment "$LABELLED_NS" idweb
eventually "a pod of a new Deployment in $LABELLED_NS is created" has_pod "$LABELLED_NS" idweb
check_identity "$LABELLED_NS" "$(pod_of "$LABELLED_NS" idweb)" || fail "the new pod lacks identity"
ok "injected pods carry the projected token (audience bulwark, 3600 s) and the anchors, mounted into the agent only"

# An anchor rotation, step 1 (both anchors in ca.crt): every namespace's ConfigMap
# follows without a restart; step 3 (the old one dropped) too.
openssl req -x509 -newkey ed25519 -nodes -days 1 -subj "/CN=bulwark e2e next anchor" \
    -keyout "$WORK/next.key" -out "$WORK/next.crt" >/dev/null 2>&1 || fail "openssl: a second anchor"
cp "$WORK/identity/ca.crt" "$WORK/old-ca.crt"
cat "$WORK/old-ca.crt" "$WORK/next.crt" >"$WORK/bundle.crt"
cp "$WORK/bundle.crt" "$WORK/identity/ca.crt"
two_anchors() { [ "$(anchors_in "$1" | grep -c 'BEGIN CERTIFICATE')" = 2 ]; }
for ns in "$APP_NS" "$LABELLED_NS"; do
    eventually "after ca.crt became two anchors, $ns/bulwark-trust-anchors holds both" two_anchors "$ns"
done
cp "$WORK/old-ca.crt" "$WORK/identity/ca.crt"
for ns in "$APP_NS" "$LABELLED_NS"; do
    eventually "back to one anchor in $ns" anchors_are "$ns" "$WORK/old-ca.crt"
done
curl -fsS "http://127.0.0.1:$ID_ADMIN_PORT/ready" >/dev/null || fail "the agent is not ready after the anchor changes"
ok "the agent stays ready throughout"

# ---------------------------------------------------------------------------
printf '\n==> summary\n'
echo "API server $SERVER_GIT (CEL validation $CEL), chart installed with $INSTALL_MODE"
echo "$CHECKS checks passed in these steps:"
printf '  - %s\n' "${SUMMARY[@]}"
printf '\nmake e2e-local: all checks passed\n'
