#!/usr/bin/env bash
# OATS test environment: a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) plus kwok with one fake node and the Kueue controller,
# all on 127.0.0.1, built from the official Go modules pinned in testenv/modules/*/go.{mod,sum}.
#
# Usage: testenv/testenv.sh up|down|env|status|logs|stop-apiserver|start-apiserver|build
# See testenv/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${OATS_TESTENV_DIR:-/tmp/oats-testenv}
CACHE=${OATS_TESTENV_CACHE:-${HOME:-/root}/.cache/oats-testenv}
TIMEOUT=${OATS_TESTENV_TIMEOUT:-180}        # seconds to wait for each component
NICE=${OATS_TESTENV_NICE:-15}               # niceness of go build
NODE_NAME=kwok-node-0
KUBECTL=${KUBECTL:-kubectl}
# Bump when the build recipe (flags below) changes, to invalidate cached binaries.
RECIPE=oats-testenv-build-v1
# Same for the Kueue build (its own cache directory, so adding it left the other binaries' key alone).
KUEUE_RECIPE=oats-testenv-kueue-build-v1
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok kueue)

die() { echo "testenv: ERROR: $*" >&2; exit 1; }
log() { echo "testenv: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Build (cached)
# ---------------------------------------------------------------------------------------------

k8s_version() {
  sed -nE 's/^[[:space:]]*(require[[:space:]]+)?k8s\.io\/kubernetes[[:space:]]+(v[0-9][^[:space:]]*).*/\2/p' \
    "$HERE/modules/k8s/go.mod" | head -n1
}

cache_key() {
  command -v go >/dev/null || die "go is not installed (needed to build the control plane)"
  {
    echo "$RECIPE"
    GOTOOLCHAIN=local go version
    for m in k8s etcd kwok; do
      echo "== $m"; cat "$HERE/modules/$m/go.mod" "$HERE/modules/$m/go.sum"
    done
  } | sha256sum | cut -c1-16
}

bin_dir() { echo "$CACHE/bin/$(cache_key)"; }

kueue_version() {
  sed -nE 's/^[[:space:]]*(require[[:space:]]+)?sigs\.k8s\.io\/kueue[[:space:]]+(v[0-9][^[:space:]]*).*/\2/p' \
    "$HERE/modules/kueue/go.mod" | head -n1
}

# Kueue reads two certificates from hard-coded absolute directories when its internal cert
# management is off (it is: that would issue the webhook certificate for a Service name, not for
# 127.0.0.1): the visibility server's from /visibility, the metrics server's from
# /etc/kueue/metrics/certs. Both become paths relative to Kueue's working directory ($DIR/kueue),
# so several environments can run side by side without writing outside $DIR: the first by a
# link-time override, the second (a local variable in cmd/kueue/main.go, Kueue's only file of
# package main) by building a copy of main.go with that one literal replaced (the build fails if it
# is not found exactly once). Go refuses overlays of files in the module cache, so the copy is
# overlaid as cmd/kueue/main.go of the wrapper module (a directory that exists only in the overlay).
KUEUE_METRICS_CERTS_FROM='"/etc/kueue/metrics/certs"'
KUEUE_METRICS_CERTS_TO='"metrics-certs"'
kueue_ldflags() {
  echo "-s -w -X 'sigs.k8s.io/kueue/pkg/version.GitVersion=$(kueue_version)' -X 'sigs.k8s.io/kueue/pkg/visibility.certDir=visibility'"
}

# kueue_overlay <dir>: writes <dir>/main.go (the patched copy) and <dir>/overlay.json, which
# makes it testenv/modules/kueue/cmd/kueue/main.go.
kueue_overlay() {
  local src main n
  src=$(kueue_src) || die "cannot locate the sigs.k8s.io/kueue module source"
  [ -n "$src" ] || die "go list reported no directory for the sigs.k8s.io/kueue module"
  main=$src/cmd/kueue/main.go
  n=$(grep -cF "$KUEUE_METRICS_CERTS_FROM" "$main" || true)
  [ "$n" = 1 ] || die "$main: expected $KUEUE_METRICS_CERTS_FROM exactly once, found ${n:-0}"
  sed "s|$KUEUE_METRICS_CERTS_FROM|$KUEUE_METRICS_CERTS_TO|" "$main" >"$1/main.go"
  jq -n --arg from "$HERE/modules/kueue/cmd/kueue/main.go" --arg to "$1/main.go" '{Replace: {($from): $to}}' >"$1/overlay.json"
}

kueue_bin_dir() {
  local key
  key=$({
    echo "$KUEUE_RECIPE"
    GOTOOLCHAIN=local go version
    kueue_ldflags
    echo "$KUEUE_METRICS_CERTS_FROM $KUEUE_METRICS_CERTS_TO"
    cat "$HERE/modules/kueue/go.mod" "$HERE/modules/kueue/go.sum"
  } | sha256sum | cut -c1-16)
  echo "$CACHE/bin/kueue-$key"
}

# kueue_src: the directory of the pinned Kueue module (CRDs and webhook manifests come from it).
kueue_src() {
  (cd "$HERE/modules/kueue" && export GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=readonly &&
    go mod download sigs.k8s.io/kueue && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
}

# go_build <module dir> <output path> <package> [ldflags [extra go build flags...]]
go_build() {
  local mod=$1 out=$2 pkg=$3 ldflags=${4:-"-s -w"} tmp start
  local extra=("${@:5}")
  tmp="$out.tmp.$$"
  start=$(date +%s)
  log "building $(basename "$out") ($pkg) ..."
  if ! (cd "$HERE/modules/$mod" &&
        GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=readonly \
          nice -n "$NICE" go build -trimpath "${extra[@]}" -ldflags "$ldflags" -o "$tmp" "$pkg"); then
    rm -f "$tmp"
    die "go build of $pkg (module testenv/modules/$mod) failed"
  fi
  mv -f "$tmp" "$out"
  log "built $(basename "$out") in $(( $(date +%s) - start ))s"
}

# kwok_crds: the Logs and ClusterLogs CRDs of the pinned kwok module (from the module cache,
# downloaded if needed), cached with the binaries so that a cached `up` needs no module cache.
kwok_crds() {
  local dir
  dir=$(cd "$HERE/modules/kwok" && GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=readonly \
    go mod download -json sigs.k8s.io/kwok | jq -r .Dir) || die "cannot locate the kwok module"
  cat "$dir/kustomize/crd/bases/kwok.x-k8s.io_logs.yaml" "$dir/kustomize/crd/bases/kwok.x-k8s.io_clusterlogs.yaml" ||
    die "kwok's Logs/ClusterLogs CRDs are missing from $dir"
}

# build: prints the bin directory, then Kueue's bin directory.
build() {
  local bin kbin ver minor ldf p
  bin=$(bin_dir)
  kbin=$(kueue_bin_dir)
  mkdir -p "$bin" "$kbin"
  exec 9>"$CACHE/build.lock"
  flock 9
  ver=$(k8s_version)
  [ -n "$ver" ] || die "cannot read the k8s.io/kubernetes version from testenv/modules/k8s/go.mod"
  minor=$(echo "$ver" | cut -d. -f2)
  ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X '$p.gitVersion=$ver' -X '$p.gitMajor=1' -X '$p.gitMinor=$minor'"
    ldf="$ldf -X '$p.gitTreeState=clean' -X '$p.buildDate=1970-01-01T00:00:00Z'"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$bin/$b" ] || go_build k8s "$bin/$b" "k8s.io/kubernetes/cmd/$b" "$ldf"
  done
  [ -x "$bin/etcd" ] || go_build etcd "$bin/etcd" go.etcd.io/etcd/server/v3
  [ -x "$bin/kwok" ] || go_build kwok "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok
  if [ ! -f "$bin/kwok-logs-crds.yaml" ]; then
    kwok_crds >"$bin/kwok-logs-crds.yaml.tmp.$$"
    mv -f "$bin/kwok-logs-crds.yaml.tmp.$$" "$bin/kwok-logs-crds.yaml"
  fi
  if [ ! -x "$kbin/kueue" ]; then
    local ov=$kbin/.overlay   # under the build lock; a failed build's copy is replaced next time
    rm -rf "$ov" && mkdir -p "$ov"
    kueue_overlay "$ov"
    go_build kueue "$kbin/kueue" ./cmd/kueue "$(kueue_ldflags)" -overlay="$ov/overlay.json"
    rm -rf "$ov"
  fi
  flock -u 9
  # Sanity: the version stamp must be there (kwokctl-style clients parse it).
  "$bin/kube-apiserver" --version | grep -qx "Kubernetes $ver" ||
    die "$bin/kube-apiserver --version does not print 'Kubernetes $ver'"
  echo "$bin"
  echo "$kbin"
}

# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

pid_of() { [ -f "$DIR/pids/$1.pid" ] && cat "$DIR/pids/$1.pid" || true; }

# proc_stat <pid>: "<state> <starttime>" from /proc/<pid>/stat (fields 3 and 22; the command name
# in field 2 may contain spaces, so the fields are counted after its closing parenthesis).
proc_stat() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  [ $# -ge 20 ] || return 1
  echo "$1 ${20}"
}

# alive <name>: the recorded process still runs. Identity is PID + start time (recorded by
# start_proc), which a fork shares with its exec: right after `&` the child may still be the
# shell's copy (its /proc/PID/cmdline is bash's until exec), so the binary's name cannot be used
# as the test. A zombie (exited, not yet reaped) is not alive. Readiness is checked separately,
# on each component's health endpoint (wait_for).
alive() {
  local pid st want exe
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  st=$(proc_stat "$pid") || return 1
  case "${st%% *}" in Z|X|x) return 1 ;; esac
  want=$(cat "$DIR/pids/$1.start" 2>/dev/null || true)
  if [ -n "$want" ]; then
    [ "${st#* }" = "$want" ]
  else
    # a PID file from an older testenv.sh without start times: fall back to the binary's name
    exe=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1)
    [ "$(basename "$exe")" = "$1" ]
  fi
}

# start_proc <name> <binary> <args...>  (environment for the child may be set by the caller)
start_proc() {
  local name=$1 pid st; shift
  mkdir -p "$DIR/logs" "$DIR/pids"
  echo "=== $(date -u +%FT%TZ) starting $name" >>"$DIR/logs/$name.log"
  "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
  pid=$!
  st=$(proc_stat "$pid" || true)
  echo "${st#* }" >"$DIR/pids/$name.start"
  echo "$pid" >"$DIR/pids/$name.pid"
}

stop_proc() {
  local name=$1 pid i
  pid=$(pid_of "$name")
  [ -n "$pid" ] || return 0
  if alive "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      alive "$name" || break
      sleep 0.1
    done
    if alive "$name"; then
      log "$name (pid $pid) did not exit after TERM; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do alive "$name" || break; sleep 0.1; done
    fi
  fi
  rm -f "$DIR/pids/$name.pid" "$DIR/pids/$name.start"
}

tail_log() {
  [ -f "$DIR/logs/$1.log" ] && { echo "----- last 40 lines of $DIR/logs/$1.log -----" >&2; tail -n 40 "$DIR/logs/$1.log" >&2; }
  return 0
}

# wait_for <name> <description> <command...>: poll until the command succeeds, the process
# dies, or TIMEOUT passes.
wait_for() {
  local name=$1 what=$2 deadline; shift 2
  deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then tail_log "$name"; die "$name exited while waiting for $what (see $DIR/logs/$name.log)"; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then tail_log "$name"; die "timed out after ${TIMEOUT}s waiting for $what"; fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# Ports, PKI, kubeconfigs
# ---------------------------------------------------------------------------------------------

# pick_port <var>: a free TCP port on 127.0.0.1 below the ephemeral range, not already picked.
PICKED=" "
pick_port() {
  local p i used
  used=$(ss -Htan 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u | tr '\n' ' ')
  for i in $(seq 1 500); do
    p=$(( 20000 + RANDOM % 12000 ))
    case " $used $PICKED " in *" $p "*) continue ;; esac
    PICKED="$PICKED$p "
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "could not find a free port"
}

make_pki() {
  local pki=$DIR/pki
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=oats-testenv-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    cat >apiserver.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile apiserver.ext
    openssl verify -CAfile ca.crt apiserver.crt
    # kwok's kubelet-style server (logs), verified by the apiserver (--kubelet-certificate-authority)
    openssl req -newkey rsa:2048 -nodes -keyout kwok.key -out kwok.csr -subj "/CN=$NODE_NAME"
    cat >kwok.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$NODE_NAME,IP:127.0.0.1
EOF
    openssl x509 -req -in kwok.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out kwok.crt -days 3650 -extfile kwok.ext
    openssl verify -CAfile ca.crt kwok.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    # Front proxy (API aggregation): the apiserver authenticates to aggregated API servers
    # (Kueue's visibility server) with this client certificate and passes the user in headers.
    openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
      -subj "/CN=oats-testenv-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
      -subj "/CN=front-proxy-client"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=clientAuth" >front-proxy-client.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -out front-proxy-client.crt -days 3650 -extfile front-proxy-client.ext
    # Kueue's webhook and visibility servers (127.0.0.1 / localhost), signed by the cluster CA,
    # which is the caBundle of Kueue's webhook configurations.
    openssl req -newkey rsa:2048 -nodes -keyout kueue.key -out kueue.csr -subj "/CN=kueue"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >kueue.ext
    openssl x509 -req -in kueue.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out kueue.crt -days 3650 -extfile kueue.ext
    openssl verify -CAfile ca.crt kueue.crt
  ) >"$pki/openssl.log" 2>&1 || { cat "$pki/openssl.log" >&2; die "openssl failed to create the PKI"; }
}

# mkkc <name> <token>: kubeconfig for one identity (CA embedded).
mkkc() {
  cat >"$DIR/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: oats-testenv
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$DIR/pki/ca.crt")
users:
- name: $1
  user:
    token: $2
contexts:
- name: $1
  context: {cluster: oats-testenv, user: $1}
current-context: $1
EOF
  chmod 600 "$DIR/$1.kubeconfig"
}

load_state() {
  [ -f "$DIR/state" ] || die "no test environment in $DIR (run: $0 up)"
  # shellcheck disable=SC1091
  . "$DIR/state"
}

# api <curl args...>: call the apiserver as admin.
api() {
  curl -fsS --max-time 10 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$@"
}

apiserver_ready() { api "https://127.0.0.1:$API_PORT/readyz" >/dev/null; }

node_ready() {
  api "https://127.0.0.1:$API_PORT/api/v1/nodes/$NODE_NAME" | jq -e --argjson port "$KWOK_PORT" '
    ([.status.conditions[]? | select(.type == "Ready" and .status == "True")] | length == 1)
    and ([.spec.taints[]? | select(.key | startswith("node.kubernetes.io/"))] | length == 0)
    and .status.daemonEndpoints.kubeletEndpoint.Port == $port'
}

# install_kwok_crds: kwok's Logs and ClusterLogs CRDs (cached with the binaries), which tell its
# server which file holds a pod's logs. kwok must find them established when it starts.
install_kwok_crds() {
  local doc
  awk -v dir="$DIR" 'FNR == 1 || /^---$/ { n++ } !/^---$/ { print > (dir "/kwok-crd-" n ".yaml") }' \
    "$BIN/kwok-logs-crds.yaml"
  for doc in "$DIR"/kwok-crd-*.yaml; do
    api -X POST -H 'Content-Type: application/yaml' --data-binary @"$doc" \
      "$APISERVER/apis/apiextensions.k8s.io/v1/customresourcedefinitions" >/dev/null ||
      die "could not create the CRD in $doc"
  done
  rm -f "$DIR"/kwok-crd-*.yaml
}

kwok_crds_established() {
  local crd
  for crd in logs.kwok.x-k8s.io clusterlogs.kwok.x-k8s.io; do
    api "$APISERVER/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$crd" |
      jq -e '[.status.conditions[]? | select(.type == "Established" and .status == "True")] | length == 1' || return 1
  done
}

# authn_config_readable <token>: the identity behind <token> can read the configmap
# kube-system/extension-apiserver-authentication and it holds the client CA. kube-controller-manager
# and kube-scheduler read it once at startup (delegated authentication) and exit with "unable to
# load configmap based request-header-client-ca-file" if that read fails (e.g. Forbidden while the
# RBAC authorizer's cache has not yet seen the bootstrap RoleBinding). The apiserver creates it
# from a post-start hook that /readyz does not wait for.
authn_config_readable() {
  curl -fsS --max-time 10 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $1" \
    "https://127.0.0.1:$API_PORT/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication" |
    jq -e '.data["client-ca-file"] | length > 0'
}

default_sa_exists() { api "https://127.0.0.1:$API_PORT/api/v1/namespaces/default/serviceaccounts/default"; }

# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

start_apiserver() {
  local args=()
  mapfile -t args <"$DIR/kube-apiserver.args"
  start_proc kube-apiserver "$BIN/kube-apiserver" "${args[@]}"
  wait_for kube-apiserver "kube-apiserver /readyz on 127.0.0.1:$API_PORT" apiserver_ready
}

# kc <kubectl args...>: kubectl as admin.
kc() { "$KUBECTL" --kubeconfig="$DIR/admin.kubeconfig" "$@"; }

kueue_ready() { curl -fsS --max-time 5 "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz"; }

# kueue_webhook_answers: the apiserver can call Kueue's webhooks (a server-side dry run of a
# ResourceFlavor passes its mutating and validating webhooks, which fail closed).
kueue_webhook_answers() {
  kc create --dry-run=server -o name -f - <<'EOF'
{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "testenv-probe"}}
EOF
}

visibility_served() { api "$APISERVER/apis/visibility.kueue.x-k8s.io/v1beta2" | jq -e '.resources | length > 0'; }

# start_kueue: installs Kueue's CRDs, RBAC (for its own token identity), webhook configurations
# (URLs on 127.0.0.1, caBundle = the cluster CA) and the APIServices of its visibility API, and
# starts the controller. The aggregator reaches the visibility server through an ExternalName
# Service `localhost` (it resolves such a Service to https://<externalName>:<port> itself;
# Endpoints cannot hold loopback addresses).
start_kueue() {
  local src kdir=$DIR/kueue ca d
  src=$(kueue_src) || die "cannot locate the sigs.k8s.io/kueue module source"
  [ -n "$src" ] || die "go list reported no directory for the sigs.k8s.io/kueue module"
  kc create -f "$src/config/components/crd/bases" >/dev/null || die "could not create Kueue's CRDs"
  kc wait --for=condition=Established --timeout="${TIMEOUT}s" -f "$src/config/components/crd/bases" >/dev/null ||
    die "Kueue's CRDs did not become Established"
  kc create namespace kueue-system >/dev/null || die "could not create namespace kueue-system"
  kc create --dry-run=client -o json -f "$src/config/components/rbac/role.yaml" |
    jq '.metadata.name = "kueue-manager-role"' | kc create -f - >/dev/null || die "could not create ClusterRole kueue-manager-role"
  kc create --dry-run=client -o json -f "$src/config/components/rbac/manager_secrets_role.yaml" |
    jq '.metadata.name = "kueue-manager-secrets-role" | .metadata.namespace = "kueue-system"' |
    kc create -f - >/dev/null || die "could not create Role kueue-system/kueue-manager-secrets-role"
  if ! { kc create clusterrolebinding kueue-manager --clusterrole=kueue-manager-role --user=kueue &&
         kc -n kueue-system create rolebinding kueue-manager-secrets --role=kueue-manager-secrets-role --user=kueue &&
         kc create clusterrolebinding kueue-auth-delegator --clusterrole=system:auth-delegator --user=kueue &&
         kc -n kube-system create rolebinding kueue-extension-apiserver-authentication-reader \
           --role=extension-apiserver-authentication-reader --user=kueue; } >/dev/null; then
    die "could not bind Kueue's roles"
  fi

  mkdir -p "$kdir/certs" "$kdir/visibility" "$kdir/metrics-certs"
  for d in certs visibility metrics-certs; do
    cp "$DIR/pki/kueue.crt" "$kdir/$d/tls.crt"; cp "$DIR/pki/kueue.key" "$kdir/$d/tls.key"
  done
  cat >"$kdir/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: 127.0.0.1:$KUEUE_METRICS_PORT
webhook:
  host: 127.0.0.1
  port: $KUEUE_WEBHOOK_PORT
  certDir: $kdir/certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
visibilityServer:
  bindAddress: 127.0.0.1
  bindPort: $KUEUE_VISIBILITY_PORT
fairSharing:
  preemptionStrategies: [LessThanOrEqualToFinalShare, LessThanInitialShare]
integrations:
  frameworks: ["batch/job"]
EOF
  start_proc kueue env -C "$kdir" "$KUEUE_BIN/kueue" --config="$kdir/config.yaml" \
    --kubeconfig="$DIR/kueue.kubeconfig" --zap-log-level=info
  wait_for kueue "Kueue /readyz on 127.0.0.1:$KUEUE_HEALTH_PORT" kueue_ready

  # Only the webhooks Kueue serves here: its own API and batch/v1 Jobs (the others are for
  # integrations that are not enabled, and would reject every Pod, Deployment, ...).
  ca=$(base64 -w0 "$DIR/pki/ca.crt")
  kc create --dry-run=client -o json -f "$src/config/components/webhook/manifests.yaml" |
    jq --arg base "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" --arg ca "$ca" '
      .metadata.name = "kueue-" + .metadata.name
      | .webhooks |= map(select(.clientConfig.service.path | test("-kueue-x-k8s-io-|-batch-v1-job$"))
          | .clientConfig = {url: ($base + .clientConfig.service.path), caBundle: $ca})' |
    kc create -f - >/dev/null || die "could not create Kueue's webhook configurations"
  wait_for kueue "Kueue's webhooks to answer the apiserver (127.0.0.1:$KUEUE_WEBHOOK_PORT)" kueue_webhook_answers

  kc create -f - >/dev/null <<EOF || die "could not register Kueue's visibility API"
{"apiVersion": "v1", "kind": "List", "items": [
 {"apiVersion": "v1", "kind": "Service",
  "metadata": {"name": "visibility-server", "namespace": "kueue-system"},
  "spec": {"type": "ExternalName", "externalName": "localhost",
           "ports": [{"name": "https", "port": $KUEUE_VISIBILITY_PORT, "protocol": "TCP"}]}},
 {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
  "metadata": {"name": "v1beta2.visibility.kueue.x-k8s.io"},
  "spec": {"group": "visibility.kueue.x-k8s.io", "version": "v1beta2",
           "groupPriorityMinimum": 100, "versionPriority": 100, "insecureSkipTLSVerify": true,
           "service": {"name": "visibility-server", "namespace": "kueue-system", "port": $KUEUE_VISIBILITY_PORT}}},
 {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
  "metadata": {"name": "v1beta1.visibility.kueue.x-k8s.io"},
  "spec": {"group": "visibility.kueue.x-k8s.io", "version": "v1beta1",
           "groupPriorityMinimum": 100, "versionPriority": 90, "insecureSkipTLSVerify": true,
           "service": {"name": "visibility-server", "namespace": "kueue-system", "port": $KUEUE_VISIBILITY_PORT}}}]}
EOF
  wait_for kueue "Kueue's visibility API through the apiserver (/apis/visibility.kueue.x-k8s.io/v1beta2)" visibility_served
}

cmd_up() {
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
  command -v jq >/dev/null || die "jq not found"
  command -v ss >/dev/null || die "ss (iproute2) not found"
  command -v "$KUBECTL" >/dev/null || die "kubectl not found (set KUBECTL)"

  if [ -f "$DIR/state" ]; then
    local n running=0
    for n in "${COMPONENTS[@]}"; do alive "$n" && running=$((running + 1)); done
    if [ "$running" -gt 0 ]; then
      load_state
      if [ "$running" -eq "${#COMPONENTS[@]}" ] && apiserver_ready 2>/dev/null; then
        [ -n "${KWOK_PORT:-}" ] ||
          log "WARNING: this environment was started by an older testenv.sh and serves no pod logs; run '$0 down' and '$0 up'"
        log "already up in $DIR (apiserver $APISERVER)"
        return 0
      fi
      die "a partial test environment is running in $DIR ($running of ${#COMPONENTS[@]} processes); run '$0 down' first"
    fi
  fi

  local t0 bins
  t0=$(date +%s)
  bins=$(build)
  BIN=$(sed -n 1p <<<"$bins")
  KUEUE_BIN=$(sed -n 2p <<<"$bins")
  log "binaries: $BIN, $KUEUE_BIN"

  # Fresh run directory (only our own sub-paths are removed).
  mkdir -p "$DIR"
  rm -rf "$DIR/pki" "$DIR/etcd" "$DIR/logs" "$DIR/pids" "$DIR/kwok-workdir" \
    "$DIR/state" "$DIR/env" "$DIR"/*.kubeconfig "$DIR/tokens.csv" "$DIR/kube-apiserver.args" \
    "$DIR/kube-scheduler.yaml" "$DIR/kueue"
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/kwok-workdir"
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "testenv: up failed; stopping what was started (logs kept in $DIR/logs)" >&2; cmd_down >/dev/null 2>&1 || true; fi' EXIT

  make_pki
  ADMIN_TOKEN=$(openssl rand -hex 24)
  local kcm_token sched_token kueue_token alice_token bob_token
  kcm_token=$(openssl rand -hex 24); sched_token=$(openssl rand -hex 24); kueue_token=$(openssl rand -hex 24)
  alice_token=$(openssl rand -hex 24); bob_token=$(openssl rand -hex 24)
  cat >"$DIR/tokens.csv" <<EOF
$ADMIN_TOKEN,oats-admin,uid-oats-admin,"system:masters"
$kcm_token,system:kube-controller-manager,uid-kcm
$sched_token,system:kube-scheduler,uid-scheduler
$kueue_token,kueue,uid-kueue
$alice_token,alice,uid-alice,"oats-testers"
$bob_token,bob,uid-bob,"oats-testers"
EOF
  chmod 600 "$DIR/tokens.csv"

  local ETCD_PORT ETCD_PEER_PORT KCM_PORT SCHED_PORT
  pick_port ETCD_PORT; pick_port ETCD_PEER_PORT; pick_port API_PORT; pick_port KCM_PORT; pick_port SCHED_PORT
  pick_port KWOK_PORT
  pick_port KUEUE_WEBHOOK_PORT; pick_port KUEUE_VISIBILITY_PORT; pick_port KUEUE_HEALTH_PORT; pick_port KUEUE_METRICS_PORT
  APISERVER=https://127.0.0.1:$API_PORT
  mkkc admin "$ADMIN_TOKEN"; mkkc kube-controller-manager "$kcm_token"
  mkkc kube-scheduler "$sched_token"; mkkc kueue "$kueue_token"; mkkc alice "$alice_token"; mkkc bob "$bob_token"

  cat >"$DIR/state" <<EOF
BIN=$BIN
API_PORT=$API_PORT
ETCD_PORT=$ETCD_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
KWOK_PORT=$KWOK_PORT
KUEUE_BIN=$KUEUE_BIN
KUEUE_WEBHOOK_PORT=$KUEUE_WEBHOOK_PORT
KUEUE_VISIBILITY_PORT=$KUEUE_VISIBILITY_PORT
KUEUE_HEALTH_PORT=$KUEUE_HEALTH_PORT
KUEUE_METRICS_PORT=$KUEUE_METRICS_PORT
APISERVER=$APISERVER
ADMIN_TOKEN=$ADMIN_TOKEN
EOF
  chmod 600 "$DIR/state"

  # --- etcd 3.6
  start_proc etcd "$BIN/etcd" --name=oats --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="oats=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new \
    --unsafe-no-fsync=true --log-level=warn
  wait_for etcd "etcd /health on 127.0.0.1:$ETCD_PORT" \
    sh -c "curl -fsS --max-time 5 http://127.0.0.1:$ETCD_PORT/health | grep -q '\"health\":\"true\"'"

  # --- kube-apiserver (flags saved so start-apiserver can restart it identically)
  cat >"$DIR/kube-apiserver.args" <<EOF
--etcd-servers=http://127.0.0.1:$ETCD_PORT
--bind-address=127.0.0.1
--advertise-address=127.0.0.1
--endpoint-reconciler-type=none
--secure-port=$API_PORT
--cert-dir=$DIR/pki
--tls-cert-file=$DIR/pki/apiserver.crt
--tls-private-key-file=$DIR/pki/apiserver.key
--client-ca-file=$DIR/pki/ca.crt
--requestheader-client-ca-file=$DIR/pki/front-proxy-ca.crt
--requestheader-allowed-names=front-proxy-client
--requestheader-username-headers=X-Remote-User
--requestheader-group-headers=X-Remote-Group
--requestheader-extra-headers-prefix=X-Remote-Extra-
--proxy-client-cert-file=$DIR/pki/front-proxy-client.crt
--proxy-client-key-file=$DIR/pki/front-proxy-client.key
--token-auth-file=$DIR/tokens.csv
--anonymous-auth=false
--authorization-mode=Node,RBAC
--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,PodSecurity,ValidatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,NodeRestriction
--service-account-issuer=https://kubernetes.default.svc.cluster.local
--service-account-key-file=$DIR/pki/sa.pub
--service-account-signing-key-file=$DIR/pki/sa.key
--service-cluster-ip-range=10.96.0.0/16
--allow-privileged=true
--shutdown-watch-termination-grace-period=2s
--kubelet-preferred-address-types=InternalIP
--kubelet-certificate-authority=$DIR/pki/ca.crt
--profiling=false
--v=1
EOF
  start_apiserver

  # --- kube-controller-manager: only once its identity can read the authentication configmap
  # (see authn_config_readable); --authentication-tolerate-lookup-failure keeps a late read (a
  # timeout on a loaded machine) from being fatal: nothing here uses request-header auth on the
  # component's own port, whose health paths are always allowed.
  wait_for kube-apiserver "configmap kube-system/extension-apiserver-authentication readable by system:kube-controller-manager" \
    authn_config_readable "$kcm_token"
  start_proc kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
    --authentication-tolerate-lookup-failure=true \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --leader-elect=false --use-service-account-credentials=true \
    --controllers='*' \
    --service-account-private-key-file="$DIR/pki/sa.key" --root-ca-file="$DIR/pki/ca.crt" \
    --cluster-signing-cert-file="$DIR/pki/ca.crt" --cluster-signing-key-file="$DIR/pki/ca.key" \
    --profiling=false --v=1
  wait_for kube-controller-manager "kube-controller-manager /healthz on 127.0.0.1:$KCM_PORT" \
    curl -fsSk --max-time 5 "https://127.0.0.1:$KCM_PORT/healthz"

  # --- kube-scheduler
  cat >"$DIR/kube-scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $DIR/kube-scheduler.kubeconfig
leaderElection:
  leaderElect: false
EOF
  wait_for kube-apiserver "configmap kube-system/extension-apiserver-authentication readable by system:kube-scheduler" \
    authn_config_readable "$sched_token"
  start_proc kube-scheduler "$BIN/kube-scheduler" --config="$DIR/kube-scheduler.yaml" \
    --authentication-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authentication-tolerate-lookup-failure=true \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --profiling=false --v=1
  wait_for kube-scheduler "kube-scheduler /readyz on 127.0.0.1:$SCHED_PORT" \
    curl -fsSk --max-time 5 "https://127.0.0.1:$SCHED_PORT/readyz"

  # --- kwok, with its kubelet-style server on 127.0.0.1:$KWOK_PORT (HTTPS, certificate from our
  # CA) serving pod logs as its Logs/ClusterLogs objects say; the node advertises that port
  # (--node-port, daemonEndpoints) and the apiserver dials the node's InternalIP. Node and pod
  # IPs are loopback addresses, so that anything that would dial them stays on 127.0.0.0/8.
  install_kwok_crds
  wait_for kube-apiserver "kwok's Logs and ClusterLogs CRDs established" kwok_crds_established
  KWOK_WORKDIR="$DIR/kwok-workdir" start_proc kwok "$BIN/kwok" \
    --kubeconfig="$DIR/admin.kubeconfig" \
    --config="$HERE/kwok/node-stages.yaml" --config="$HERE/kwok/pod-stages.yaml" \
    --config="$HERE/kwok/oats-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-label-selector=type=kwok \
    --node-ip=127.0.0.1 --cidr=127.244.0.1/16 --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$KWOK_PORT" --node-port="$KWOK_PORT" \
    --tls-cert-file="$DIR/pki/kwok.crt" --tls-private-key-file="$DIR/pki/kwok.key" \
    --enable-crds=Logs,ClusterLogs
  wait_for kwok "kwok's server on 127.0.0.1:$KWOK_PORT" \
    curl -fsS --max-time 5 --cacert "$DIR/pki/ca.crt" "https://127.0.0.1:$KWOK_PORT/healthz"

  # --- the fake node
  api -X POST -H 'Content-Type: application/json' "$APISERVER/api/v1/nodes" -d @- >/dev/null <<EOF || die "could not create node $NODE_NAME"
{"apiVersion": "v1", "kind": "Node",
 "metadata": {"name": "$NODE_NAME",
   "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
   "labels": {"type": "kwok", "kubernetes.io/hostname": "$NODE_NAME", "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", "kubernetes.io/role": "agent", "node-role.kubernetes.io/agent": ""}},
 "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"},
            "capacity":    {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}}}
EOF
  wait_for kwok "node $NODE_NAME Ready and untainted" node_ready
  wait_for kube-controller-manager "service account default/default" default_sa_exists

  # --- Kueue (after the rest: it needs its CRDs, and the aggregator for its visibility API)
  start_kueue

  cat >"$DIR/env" <<EOF
export KUBECONFIG=$DIR/admin.kubeconfig
export OATS_TESTENV_DIR=$DIR
export OATS_TESTENV_APISERVER=$APISERVER
EOF
  trap - EXIT
  log "up in $(( $(date +%s) - t0 ))s: apiserver $APISERVER, kubeconfig $DIR/admin.kubeconfig"
}

cmd_down() {
  local n
  for n in kueue kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_proc "$n"; done
  log "down (logs kept in $DIR/logs)"
}

cmd_env() {
  [ -f "$DIR/env" ] || die "no test environment in $DIR (run: $0 up)"
  cat "$DIR/env"
}

cmd_status() {
  local n rc=0
  for n in "${COMPONENTS[@]}"; do
    if alive "$n"; then echo "$n running (pid $(pid_of "$n"))"; else echo "$n stopped"; rc=1; fi
  done
  return $rc
}

cmd_logs() {
  local f
  for f in "$DIR"/logs/*.log; do
    [ -f "$f" ] || continue
    echo "===== $f (last 200 lines) ====="
    tail -n 200 "$f"
  done
}

cmd_stop_apiserver() {
  load_state
  alive kube-apiserver || log "kube-apiserver is not running"
  stop_proc kube-apiserver
  log "kube-apiserver stopped"
}

cmd_start_apiserver() {
  load_state
  alive kube-apiserver && die "kube-apiserver is already running (pid $(pid_of kube-apiserver))"
  start_apiserver
  log "kube-apiserver started again on $APISERVER"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  stop-apiserver) cmd_stop_apiserver ;;
  start-apiserver) cmd_start_apiserver ;;
  build) build ;;
  *) echo "usage: $0 up|down|env|status|logs|stop-apiserver|start-apiserver|build" >&2; exit 2 ;;
esac
