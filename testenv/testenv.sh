#!/usr/bin/env bash
# OATS test environment: a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) plus kwok with one fake node, all on 127.0.0.1,
# built from the official Go modules pinned in testenv/modules/*/go.{mod,sum}.
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
# Bump when the build recipe (flags below) changes, to invalidate cached binaries.
RECIPE=oats-testenv-build-v1
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

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

# go_build <module dir> <output path> <package> [ldflags]
go_build() {
  local mod=$1 out=$2 pkg=$3 ldflags=${4:-"-s -w"} tmp start
  tmp="$out.tmp.$$"
  start=$(date +%s)
  log "building $(basename "$out") ($pkg) ..."
  if ! (cd "$HERE/modules/$mod" &&
        GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=readonly \
          nice -n "$NICE" go build -trimpath -ldflags "$ldflags" -o "$tmp" "$pkg"); then
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

build() {
  local bin ver minor ldf p
  bin=$(bin_dir)
  mkdir -p "$bin"
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
  flock -u 9
  # Sanity: the version stamp must be there (kwokctl-style clients parse it).
  "$bin/kube-apiserver" --version | grep -qx "Kubernetes $ver" ||
    die "$bin/kube-apiserver --version does not print 'Kubernetes $ver'"
  echo "$bin"
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

cmd_up() {
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
  command -v jq >/dev/null || die "jq not found"
  command -v ss >/dev/null || die "ss (iproute2) not found"

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

  local t0 bin
  t0=$(date +%s)
  bin=$(build)
  BIN=$bin
  log "binaries: $BIN"

  # Fresh run directory (only our own sub-paths are removed).
  mkdir -p "$DIR"
  rm -rf "$DIR/pki" "$DIR/etcd" "$DIR/logs" "$DIR/pids" "$DIR/kwok-workdir" \
    "$DIR/state" "$DIR/env" "$DIR"/*.kubeconfig "$DIR/tokens.csv" "$DIR/kube-apiserver.args" \
    "$DIR/kube-scheduler.yaml"
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/kwok-workdir"
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "testenv: up failed; stopping what was started (logs kept in $DIR/logs)" >&2; cmd_down >/dev/null 2>&1 || true; fi' EXIT

  make_pki
  ADMIN_TOKEN=$(openssl rand -hex 24)
  local kcm_token sched_token alice_token bob_token
  kcm_token=$(openssl rand -hex 24); sched_token=$(openssl rand -hex 24)
  alice_token=$(openssl rand -hex 24); bob_token=$(openssl rand -hex 24)
  cat >"$DIR/tokens.csv" <<EOF
$ADMIN_TOKEN,oats-admin,uid-oats-admin,"system:masters"
$kcm_token,system:kube-controller-manager,uid-kcm
$sched_token,system:kube-scheduler,uid-scheduler
$alice_token,alice,uid-alice,"oats-testers"
$bob_token,bob,uid-bob,"oats-testers"
EOF
  chmod 600 "$DIR/tokens.csv"

  local ETCD_PORT ETCD_PEER_PORT KCM_PORT SCHED_PORT
  pick_port ETCD_PORT; pick_port ETCD_PEER_PORT; pick_port API_PORT; pick_port KCM_PORT; pick_port SCHED_PORT
  pick_port KWOK_PORT
  APISERVER=https://127.0.0.1:$API_PORT
  mkkc admin "$ADMIN_TOKEN"; mkkc kube-controller-manager "$kcm_token"
  mkkc kube-scheduler "$sched_token"; mkkc alice "$alice_token"; mkkc bob "$bob_token"

  cat >"$DIR/state" <<EOF
BIN=$BIN
API_PORT=$API_PORT
ETCD_PORT=$ETCD_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
KWOK_PORT=$KWOK_PORT
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
  for n in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_proc "$n"; done
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
