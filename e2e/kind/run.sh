#!/usr/bin/env bash
# Mortar on a kind cluster, end to end:
#   create a cluster (1 control plane + 3 workers), build and load the image, install the
#   chart, apply examples/cluster.yaml and wait for Ready; two pods on different nodes share
#   one RWX PVC (one writes, the other reads); delete a brick pod and follow the status
#   (Degraded -> Healing -> Ready) while writing; scale bricks 3 -> 4 -> 3; delete the CSI
#   node plugin's pods (not the mounter's) and check that the pods' mounts still work; then
#   the Kubernetes external-storage e2e suite with e2e/kind/storage-driver.yaml when an
#   e2e.test binary is available (E2E_TEST=PATH, or e2e.test on PATH).
#
#   e2e/kind/run.sh [--keep] [--prebuilt DIR]
#
# --keep leaves the cluster (kind delete cluster --name mortar-e2e to remove it);
# --prebuilt DIR builds the image from binaries in DIR (cargo build --release: target/release)
# instead of compiling in the image. KIND_CLUSTER names the cluster, KIND_NODE_IMAGE picks
# the node image (Kubernetes >= 1.28). Needs docker (a running engine), kind, kubectl and
# helm; exits 77 with a SKIP line when one is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/e2e/kind"
cluster="${KIND_CLUSTER:-mortar-e2e}"
image="mortar:0.1.0"
ns=mortar-system
keep=""
prebuilt=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; shift ;;
    --prebuilt) prebuilt="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

skip() { echo "SKIP: e2e/kind/run.sh: $*"; exit 77; }
command -v docker >/dev/null || skip "docker is not installed"
docker info >/dev/null 2>&1 || skip "the docker engine is not reachable (docker info fails)"
command -v kind >/dev/null || skip "kind is not installed"
command -v kubectl >/dev/null || skip "kubectl is not installed"
command -v helm >/dev/null || skip "helm is not installed"

step() { echo; echo "== $(date +%T) $*"; }
fail() {
  echo "run.sh: FAILED: $*" >&2
  kubectl get ssc,pods,pvc -A -o wide >&2 || true
  kubectl logs -n "$ns" -l app.kubernetes.io/component=operator --tail=50 >&2 || true
  kubectl logs -n "$ns" -l app.kubernetes.io/component=csi-mounter --tail=50 >&2 || true
  exit 1
}
cleanup() {
  if [ -z "$keep" ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  else
    echo "kept: kind cluster $cluster (kubectl context kind-$cluster)"
  fi
}

# phase of the SharedStorageCluster storage/shared
phase() { kubectl get ssc shared -n storage -o jsonpath='{.status.phase}' 2>/dev/null || true; }
ready_bricks() { kubectl get ssc shared -n storage -o jsonpath='{.status.readyBricks}' 2>/dev/null || true; }
wait_ready() { # wait_ready BRICKS TIMEOUT_SECONDS
  local deadline=$((SECONDS + $2))
  until [ "$(phase)" = Ready ] && [ "$(ready_bricks)" = "$1" ]; do
    [ $SECONDS -lt $deadline ] || fail "cluster not Ready with $1 bricks after $2 s (phase $(phase))"
    sleep 2
  done
}
in_brick() { kubectl exec -n storage shared-brick-0 -c brick -- "$@"; }

step "kind cluster $cluster"
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "reusing the existing cluster $cluster"
else
  kind create cluster --name "$cluster" --config "$here/kind-config.yaml" --wait 180s \
    ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
trap cleanup EXIT
kubectl config use-context "kind-$cluster" >/dev/null

step "image $image"
if [ -n "$prebuilt" ]; then
  CONTAINER_TOOL=docker "$root/e2e/local/build-image.sh" --prebuilt "$prebuilt" --tag "$image"
else
  docker build -t "$image" "$root"
fi
kind load docker-image "$image" --name "$cluster"

step "helm install"
helm upgrade --install mortar "$root/charts/mortar" --namespace "$ns" --create-namespace \
  -f "$here/values.yaml" --wait --timeout 5m

step "SharedStorageCluster storage/shared (examples/cluster.yaml)"
kubectl apply -f "$root/examples/cluster.yaml"
wait_ready 3 600
kubectl get ssc -n storage
in_brick mortar status 127.0.0.1:/data

step "two pods on different nodes share one RWX PVC"
kubectl apply -f "$root/examples/storageclass.yaml"
kubectl apply -f "$here/manifests/shared-pvc.yaml"
kubectl wait -n mortar-e2e --for=condition=Ready pod/writer pod/reader --timeout=300s
wnode="$(kubectl get pod writer -n mortar-e2e -o jsonpath='{.spec.nodeName}')"
rnode="$(kubectl get pod reader -n mortar-e2e -o jsonpath='{.spec.nodeName}')"
[ "$wnode" != "$rnode" ] || fail "writer and reader both on $wnode"
want="hello from writer"
for _ in $(seq 1 30); do
  got="$(kubectl exec -n mortar-e2e reader -- cat /data/hello.txt 2>/dev/null || true)"
  [ "$got" = "$want" ] && break
  sleep 1
done
[ "$got" = "$want" ] || fail "reader on $rnode read '$got', want '$want' (written on $wnode)"
echo "writer on $wnode wrote, reader on $rnode read: $got"

step "delete brick pod shared-brick-1 and keep writing"
kubectl delete pod shared-brick-1 -n storage --wait=false
seen=""
deadline=$((SECONDS + 600))
n=0
while :; do
  p="$(phase)"
  case " $seen " in *" $p "*) ;; *) seen="$seen $p"; echo "phase: $p" ;; esac
  n=$((n + 1))
  kubectl exec -n mortar-e2e writer -- sh -c "echo line $n >> /data/log.txt" \
    || fail "write $n failed while a brick was away"
  if [ "$p" = Ready ] && [ "$(ready_bricks)" = 3 ] && [ "$seen" != " Ready" ]; then break; fi
  [ $SECONDS -lt $deadline ] || fail "not Ready again after 600 s (phases:$seen)"
  sleep 1
done
case "$seen" in *Degraded*|*Healing*) ;; *) fail "never saw Degraded or Healing (phases:$seen)" ;; esac
echo "phases:$seen"
lines="$(kubectl exec -n mortar-e2e reader -- wc -l /data/log.txt | awk '{print $1}')"
[ "$lines" = "$n" ] || fail "reader sees $lines lines, $n were written"
in_brick mortar verify 127.0.0.1:/data || fail "bricks differ after the heal"

step "scale 3 -> 4 -> 3"
kubectl patch ssc shared -n storage --type merge -p '{"spec":{"bricks":4}}'
wait_ready 4 900
in_brick mortar status 127.0.0.1:/data
in_brick mortar verify 127.0.0.1:/data || fail "bricks differ after scaling up"
kubectl patch ssc shared -n storage --type merge -p '{"spec":{"bricks":3}}'
wait_ready 3 900
kubectl wait -n storage --for=delete pod/shared-brick-3 --timeout=300s
kubectl wait -n storage --for=delete pvc/data-shared-brick-3 --timeout=300s
in_brick mortar verify 127.0.0.1:/data || fail "bricks differ after scaling down"
[ "$(kubectl exec -n mortar-e2e reader -- cat /data/hello.txt)" = "$want" ] \
  || fail "data changed across scaling"

step "replace the CSI node plugin's pods; the pods' mounts keep working"
# The FUSE daemons live in the mounter's DaemonSet (updateStrategy OnDelete), which this must
# not touch: only the node plugin's pods on the writer's and reader's nodes are deleted, as a
# helm upgrade would replace them.
mounters() {
  kubectl get pods -n "$ns" -l app.kubernetes.io/component=csi-mounter \
    -o jsonpath='{range .items[*]}{.spec.nodeName}={.metadata.uid}{"\n"}{end}' | sort
}
mounters_before="$(mounters)"
for node in "$wnode" "$rnode"; do
  echo "$mounters_before" | grep -q "^$node=" || fail "no mounter pod on $node"
done
# "UID READY" of the node plugin pods on node $1.
plugins_on() {
  kubectl get pods -n "$ns" -l app.kubernetes.io/component=csi-node \
    --field-selector "spec.nodeName=$1" \
    -o jsonpath='{range .items[*]}{.metadata.uid} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}'
}
for node in "$wnode" "$rnode"; do
  old="$(plugins_on "$node" | awk '{print $1}')"
  [ -n "$old" ] || fail "no node plugin pod on $node"
  kubectl delete pod -n "$ns" -l app.kubernetes.io/component=csi-node \
    --field-selector "spec.nodeName=$node" --wait=true --timeout=120s
  deadline=$((SECONDS + 300))
  until plugins_on "$node" | grep -v "^$old " | grep -q ' True$'; do
    [ $SECONDS -lt $deadline ] || fail "no new node plugin pod Ready on $node after 300 s"
    sleep 2
  done
  echo "node plugin on $node replaced"
done
kubectl rollout status daemonset/mortar-csi-node -n "$ns" --timeout=300s
[ "$(mounters)" = "$mounters_before" ] || fail "mounter pods changed: before
$mounters_before
after
$(mounters)"
kubectl exec -n mortar-e2e writer -- sh -c 'echo after restart >> /data/hello.txt' \
  || fail "the writer's mount broke when the node plugin was replaced"
for _ in $(seq 1 30); do
  kubectl exec -n mortar-e2e reader -- grep -q 'after restart' /data/hello.txt 2>/dev/null && break
  sleep 1
done
kubectl exec -n mortar-e2e reader -- grep -q 'after restart' /data/hello.txt \
  || fail "the reader's mount broke when the node plugin was replaced"

# The Kubernetes external-storage e2e suite, as other CSI drivers run it, when its binary is
# here (E2E_TEST, else e2e.test on PATH): the driver definition states what Mortar supports.
e2e_test="${E2E_TEST:-$(command -v e2e.test || true)}"
if [ -n "$e2e_test" ]; then
  step "Kubernetes external-storage e2e suite ($e2e_test)"
  "$e2e_test" -ginkgo.focus='External.Storage' -ginkgo.skip='Disruptive|\[Feature:' \
    -ginkgo.timeout=3h -storage.testdriver="$here/storage-driver.yaml" \
    -kubeconfig "${KUBECONFIG:-$HOME/.kube/config}" -report-dir "${E2E_REPORT_DIR:-/tmp/mortar-e2e-report}" \
    || fail "the external-storage e2e suite failed"
else
  echo "(no e2e.test binary: the Kubernetes external-storage suite was not run; set E2E_TEST)"
fi

step "kind story passed"
