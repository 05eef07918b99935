#!/usr/bin/env bash
# Self-test of the OATS test environment: brings it up, checks every kwok outcome label on a
# PodSecurity-restricted namespace with real batch/v1 Jobs, checks activeDeadlineSeconds, pod logs,
# RBAC, TokenRequest, ValidatingAdmissionPolicy, Kueue admission with positions from its
# visibility API, and stop-apiserver/start-apiserver, then brings it down. Prints "N passed, M
# failed" last; exits non-zero on any failure.
#
# If the environment in $OATS_TESTENV_DIR is already up (scripts/test.sh runs this right after
# `testenv.sh up`), it is used and left up: the self-test then deletes what it created (its
# namespace, its ValidatingAdmissionPolicy and binding) instead of running `down`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TE="$HERE/testenv.sh"
KUBECTL=${KUBECTL:-kubectl}
NS=oats-selftest
PASSED=0
FAILED=0
FAILED_NAMES=()

if "$TE" status >/dev/null 2>&1; then
  WAS_UP=true
  echo "selftest: using the environment already up in ${OATS_TESTENV_DIR:-/tmp/oats-testenv} (it stays up)"
else
  WAS_UP=false
  "$TE" up
fi
eval "$("$TE" env)"
export KUBECONFIG OATS_TESTENV_DIR OATS_TESTENV_APISERVER

# remove_own_objects: what the checks create, so that a shared environment is left as found.
remove_own_objects() {
  kueue_cleanup &&
  "$KUBECTL" delete validatingadmissionpolicybinding oats-selftest-deny --ignore-not-found >/dev/null &&
    "$KUBECTL" delete validatingadmissionpolicy oats-selftest-deny --ignore-not-found >/dev/null &&
    "$KUBECTL" delete namespace "$NS" --ignore-not-found --timeout=120s >/dev/null
}

finish() {
  local rc=$?
  if [ "$FAILED" -gt 0 ] || [ "$rc" -ne 0 ]; then
    echo "selftest: failures: ${FAILED_NAMES[*]:-(aborted, exit $rc)}; component logs follow" >&2
    "$TE" logs >&2 || true
  fi
  if [ "$WAS_UP" = true ]; then
    if ! remove_own_objects; then
      echo "selftest: could not remove namespace $NS / ValidatingAdmissionPolicy oats-selftest-deny" >&2
      FAILED=$((FAILED + 1))
    fi
  else
    "$TE" down || true
  fi
  echo "$PASSED passed, $FAILED failed"
  if [ "$FAILED" -gt 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
  exit "$rc"
}
trap finish EXIT

k() { "$KUBECTL" "$@"; }

# until_true <timeout-seconds> <command...>
until_true() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

check() {
  local name=$1; shift
  local rc
  echo "--- $name"
  # not inside "if": errexit would be ignored in the subshell
  set +e
  ( set -euo pipefail; "$@" )
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    echo "PASS: $name"; PASSED=$((PASSED + 1))
  else
    echo "FAIL: $name"; FAILED=$((FAILED + 1)); FAILED_NAMES+=("$name")
  fi
}

# job <name> <goal or -> [label=value ...]: a PodSecurity-restricted OATS-like Job.
job() {
  local name=$1 goal=$2 labels="app: oats-agent" env="" l; shift 2
  for l in "$@"; do labels="$labels, ${l%%=*}: \"${l#*=}\""; done
  [ "$goal" = - ] || env="env: [{name: OATS_GOAL, value: \"$goal\"}]"
  k apply -f - >/dev/null <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $name
  namespace: $NS
  labels: {app: oats-agent}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {$labels}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: agent
        image: registry.invalid/oats/agent:selftest
        $env
        resources:
          requests: {cpu: 100m, memory: 128Mi}
          limits: {cpu: "1", memory: 512Mi}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
          runAsUser: 65532
          capabilities: {drop: [ALL]}
          seccompProfile: {type: RuntimeDefault}
EOF
}

pod_json() { k get pods -n "$NS" -l "job-name=$1" -o json | jq -e '.items[0]'; }
job_cond() { k get job -n "$NS" "$1" -o json | jq -r --arg t "$2" '.status.conditions[]? | select(.type == $t and .status == "True") | .reason'; }
has_job_cond() { [ -n "$(job_cond "$1" "$2")" ]; }
expect() { # <description> <actual> <expected>
  if [ "$2" != "$3" ]; then echo "  $1: got '$2', want '$3'" >&2; return 1; fi
  echo "  $1 = $2"
}
pod_matches() { pod_json "$1" | jq -e "$2"; }
pod_gone() { local out; out=$(k get pod -n "$NS" "$1" 2>&1) && return 1; grep -q NotFound <<<"$out"; }
secs() { date -d "$1" +%s.%N; }

# Kueue objects of the Kueue check (cluster-scoped ones outlive the namespace). Jobs first: a
# ClusterQueue and a ResourceFlavor keep their finalizers while workloads use them.
kueue_cleanup() {
  "$KUBECTL" delete jobs -n "$NS" -l oats-selftest=kueue --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || true
  "$KUBECTL" delete localqueue -n "$NS" oats-selftest --ignore-not-found --timeout=120s >/dev/null 2>&1 || true
  "$KUBECTL" delete clusterqueue oats-selftest --ignore-not-found --timeout=120s >/dev/null &&
    "$KUBECTL" delete resourceflavor oats-selftest --ignore-not-found --timeout=120s >/dev/null
}

# ---------------------------------------------------------------------------------------------

setup_namespace() {
  k create namespace "$NS" >/dev/null
  k label namespace "$NS" pod-security.kubernetes.io/enforce=restricted \
    pod-security.kubernetes.io/enforce-version=latest >/dev/null
  until_true 60 k get serviceaccount default -n "$NS"
}

podsecurity_enforced() {
  local out
  if out=$(k run -n "$NS" privileged-pod --image=registry.invalid/x --restart=Never \
      --overrides='{"spec":{"containers":[{"name":"x","image":"registry.invalid/x","securityContext":{"privileged":true}}]}}' 2>&1); then
    echo "  privileged pod was admitted: $out" >&2; return 1
  fi
  echo "$out" | grep -q 'violates PodSecurity "restricted:latest"' || { echo "  unexpected error: $out" >&2; return 1; }
  echo "  rejected: $(echo "$out" | head -c 160)..."
}

succeed_with_goal() {
  job sel-succeed "write a haiku about etcd" kwok.oats.dev/run-ms=2000
  until_true 60 has_job_cond sel-succeed Complete
  local p c
  p=$(pod_json sel-succeed)
  c=$(echo "$p" | jq '.status.containerStatuses[0]')
  expect phase "$(echo "$p" | jq -r .status.phase)" Succeeded
  expect exitCode "$(echo "$c" | jq -r .state.terminated.exitCode)" 0
  expect reason "$(echo "$c" | jq -r .state.terminated.reason)" Completed
  expect message "$(echo "$c" | jq -r .state.terminated.message)" "done: write a haiku about etcd"
  # run-ms honoured: Running -> terminated took >= ~2s
  local d
  d=$(awk -v a="$(secs "$(echo "$c" | jq -r .state.terminated.startedAt)")" \
          -v b="$(secs "$(echo "$c" | jq -r .state.terminated.finishedAt)")" 'BEGIN { printf "%.3f", b - a }')
  echo "  ran for ${d}s (run-ms=2000)"
  awk -v d="$d" 'BEGIN { exit !(d >= 1.9) }'
}

succeed_default() {
  job sel-succeed-default - kwok.oats.dev/outcome=succeed
  until_true 60 has_job_cond sel-succeed-default Complete
  expect message "$(pod_json sel-succeed-default | jq -r '.status.containerStatuses[0].state.terminated.message')" done
}

fail_exit_code() {
  job sel-fail "fail please" kwok.oats.dev/outcome=fail kwok.oats.dev/exit-code=3 kwok.oats.dev/run-ms=500
  until_true 60 has_job_cond sel-fail Failed
  local p
  p=$(pod_json sel-fail)
  expect phase "$(echo "$p" | jq -r .status.phase)" Failed
  expect exitCode "$(echo "$p" | jq -r '.status.containerStatuses[0].state.terminated.exitCode')" 3
  expect reason "$(echo "$p" | jq -r '.status.containerStatuses[0].state.terminated.reason')" Error
  expect "job Failed reason" "$(job_cond sel-fail Failed)" BackoffLimitExceeded
}

oom() {
  job sel-oom "eat memory" kwok.oats.dev/outcome=oom kwok.oats.dev/run-ms=500
  until_true 60 has_job_cond sel-oom Failed
  local p
  p=$(pod_json sel-oom)
  expect phase "$(echo "$p" | jq -r .status.phase)" Failed
  expect exitCode "$(echo "$p" | jq -r '.status.containerStatuses[0].state.terminated.exitCode')" 137
  expect reason "$(echo "$p" | jq -r '.status.containerStatuses[0].state.terminated.reason')" OOMKilled
}

pending_image_pull() {
  job sel-pending "never starts" kwok.oats.dev/outcome=pending
  until_true 60 pod_matches sel-pending '.status.containerStatuses[0].state.waiting.reason == "ImagePullBackOff"'
  sleep 5
  local p
  p=$(pod_json sel-pending)
  expect phase "$(echo "$p" | jq -r .status.phase)" Pending
  expect "waiting reason" "$(echo "$p" | jq -r '.status.containerStatuses[0].state.waiting.reason')" ImagePullBackOff
  echo "  waiting message: $(echo "$p" | jq -r '.status.containerStatuses[0].state.waiting.message')"
  expect "job active" "$(k get job -n "$NS" sel-pending -o jsonpath='{.status.active}')" 1
  expect "job conditions" "$(k get job -n "$NS" sel-pending -o json | jq -c '[.status.conditions[]?.type]')" "[]"
}

run_then_deadline() {
  job sel-run "run forever" kwok.oats.dev/outcome=run
  until_true 60 pod_matches sel-run '.status.phase == "Running"'
  sleep 5
  local p pod
  p=$(pod_json sel-run)
  pod=$(echo "$p" | jq -r .metadata.name)
  expect phase "$(echo "$p" | jq -r .status.phase)" Running
  expect "container running" "$(echo "$p" | jq -r '.status.containerStatuses[0].state | keys[0]')" running
  expect podIP-is-loopback "$(echo "$p" | jq -r '.status.podIP' | cut -d. -f1)" 127
  k patch job -n "$NS" sel-run --type=merge -p '{"spec":{"activeDeadlineSeconds":1}}' >/dev/null
  until_true 60 has_job_cond sel-run Failed
  expect "job Failed reason" "$(job_cond sel-run Failed)" DeadlineExceeded
  until_true 60 pod_gone "$pod"
  echo "  pod $pod deleted"
}

# kubectl logs of a kwok pod: kwok's server reads the file a Logs object names (CRI log format:
# "<RFC 3339 time> <stream> <F|P> <text>") and the apiserver proxies pods/log to it over TLS.
pod_logs() {
  job sel-logs "say something" kwok.oats.dev/outcome=run
  until_true 60 pod_matches sel-logs '.status.phase == "Running"'
  local pod file
  pod=$(pod_json sel-logs | jq -r .metadata.name)
  file=$(mktemp "${TMPDIR:-/tmp}/oats-selftest-logs.XXXXXX")
  printf '2026-01-02T03:04:05.000000001Z stdout F first line\n2026-01-02T03:04:06.000000002Z stderr F second line\n' >"$file"
  k apply -f - >/dev/null <<EOF
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Logs
metadata: {name: $pod, namespace: $NS}
spec:
  logs:
  - containers: [agent]
    logsFile: $file
EOF
  until_true 30 k logs -n "$NS" "$pod"
  expect "logs" "$(k logs -n "$NS" "$pod")" "$(printf 'first line\nsecond line')"
  expect "logs --tail=1 --timestamps" "$(k logs -n "$NS" "$pod" --tail=1 --timestamps)" \
    "2026-01-02T03:04:06.000000002Z second line"
  rm -f "$file"
}

rbac_and_tokens() {
  local out
  if out=$(k --kubeconfig "$OATS_TESTENV_DIR/alice.kubeconfig" get pods -n "$NS" 2>&1); then
    echo "  alice could list pods without a RoleBinding" >&2; return 1
  fi
  echo "$out" | grep -q Forbidden
  echo "  alice without RoleBinding: Forbidden"
  local tok
  tok=$(k create token default -n "$NS" --duration=10m)
  expect "TokenRequest token segments" "$(echo "$tok" | tr '.' '\n' | wc -l)" 3
  # the bound token authenticates as the service account
  expect "token identity" "$(k auth whoami --token="$tok" --kubeconfig /dev/null --server "$OATS_TESTENV_APISERVER" \
      --certificate-authority "$OATS_TESTENV_DIR/pki/ca.crt" -o jsonpath='{.status.userInfo.username}')" \
    "system:serviceaccount:$NS:default"
}

vap_denies() {
  local out
  out=$(k create -n "$NS" -f - --dry-run=server -o name 2>&1 <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: vap-probe, labels: {deny: x}}
EOF
  ) && return 1
  grep -q 'denied by oats-selftest-deny' <<<"$out"
}

validating_admission_policy() {
  k apply -f - >/dev/null <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: oats-selftest-deny}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}
  validations:
  - expression: "!has(object.metadata.labels) || !('deny' in object.metadata.labels)"
    message: denied by oats-selftest-deny
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: oats-selftest-deny}
spec:
  policyName: oats-selftest-deny
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {kubernetes.io/metadata.name: $NS}
EOF
  # the policy becomes effective asynchronously
  until_true 30 vap_denies
  echo "  labelled ConfigMap denied by ValidatingAdmissionPolicy"
  k create configmap -n "$NS" vap-allowed --from-literal=a=b >/dev/null
  echo "  unlabelled ConfigMap allowed"
}

# kueue_job <name>: a suspended Job for LocalQueue oats-selftest, requesting 1 CPU; kwok keeps
# its pod running once Kueue admits (unsuspends) it.
kueue_job() {
  k create -f - >/dev/null <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $1
  namespace: $NS
  labels: {app: oats-agent, oats-selftest: kueue, kueue.x-k8s.io/queue-name: oats-selftest}
spec:
  suspend: true
  backoffLimit: 0
  template:
    metadata:
      labels: {app: oats-agent, kwok.oats.dev/outcome: run, oats-selftest: kueue}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: agent
        image: registry.invalid/oats/agent:selftest
        resources:
          requests: {cpu: "1", memory: 128Mi}
          limits: {cpu: "1", memory: 512Mi}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          runAsNonRoot: true
          runAsUser: 65532
          capabilities: {drop: [ALL]}
          seccompProfile: {type: RuntimeDefault}
EOF
}

# suspended_count <true|false>: how many of the Kueue check's Jobs have spec.suspend = that.
suspended_count() {
  k get jobs -n "$NS" -l oats-selftest=kueue -o json | jq --argjson s "$1" '[.items[] | select(.spec.suspend == $s)] | length'
}
two_admitted_one_pending() {
  [ "$(suspended_count false)" = 2 ] && [ "$(suspended_count true)" = 1 ] &&
    # Only this check's pods: other checks leave pods of their own running in the namespace.
    [ "$(k get pods -n "$NS" -l oats-selftest=kueue -o json |
        jq '[.items[] | select(.status.phase == "Running")] | length')" = 2 ]
}
PENDING_PATH=/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/$NS/localqueues/oats-selftest/pendingworkloads
one_pending_workload() { k get --raw "$PENDING_PATH" | jq -e '.items | length == 1'; }

kueue_admission_and_positions() {
  k apply -f - >/dev/null <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: oats-selftest}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: oats-selftest}
spec:
  namespaceSelector: {}
  resourceGroups:
  - coveredResources: [cpu, memory]
    flavors:
    - name: oats-selftest
      resources:
      - {name: cpu, nominalQuota: 2}
      - {name: memory, nominalQuota: 8Gi}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {name: oats-selftest, namespace: $NS}
spec: {clusterQueue: oats-selftest}
EOF
  local j
  for j in sel-kueue-1 sel-kueue-2 sel-kueue-3; do kueue_job "$j"; done
  until_true 120 two_admitted_one_pending
  echo "  2 Jobs admitted (unsuspended, pods Running), 1 suspended"
  until_true 60 one_pending_workload
  local pending want
  pending=$(k get --raw "$PENDING_PATH")
  echo "  GET $PENDING_PATH -> $(echo "$pending" | jq -c '[.items[] | {name: .metadata.name, owner: .metadata.ownerReferences[0].name, positionInLocalQueue, positionInClusterQueue, localQueueName}]')"
  want=$(k get jobs -n "$NS" -l oats-selftest=kueue -o json | jq -r '.items[] | select(.spec.suspend) | .metadata.name')
  expect "pending workload's Job" "$(echo "$pending" | jq -r '.items[0].metadata.ownerReferences[0].name')" "$want"
  expect positionInLocalQueue "$(echo "$pending" | jq -r '.items[0].positionInLocalQueue')" 0
  expect positionInClusterQueue "$(echo "$pending" | jq -r '.items[0].positionInClusterQueue')" 0
  expect localQueueName "$(echo "$pending" | jq -r '.items[0].localQueueName')" oats-selftest
  kueue_cleanup
  if k get clusterqueue oats-selftest >/dev/null 2>&1; then echo "  ClusterQueue oats-selftest still there" >&2; return 1; fi
  echo "  Jobs, LocalQueue, ClusterQueue and ResourceFlavor deleted"
}

apiserver_restart() {
  # a Job whose pod is due to terminate while the apiserver is down
  job sel-across-restart "across restart" kwok.oats.dev/run-ms=4000
  until_true 60 pod_matches sel-across-restart '.status.phase == "Running"'
  "$TE" stop-apiserver
  if k get ns "$NS" --request-timeout=3s >/dev/null 2>&1; then echo "  apiserver still answers" >&2; return 1; fi
  echo "  apiserver down"
  sleep 6
  "$TE" start-apiserver
  k get ns "$NS" >/dev/null
  echo "  apiserver back"
  # kwok retries its status patch; the Job controller resyncs (client-go backoff: up to ~30 s)
  until_true 120 has_job_cond sel-across-restart Complete
  expect "message (terminated while apiserver was down)" \
    "$(pod_json sel-across-restart | jq -r '.status.containerStatuses[0].state.terminated.message')" "done: across restart"
  # the controllers, scheduler and kwok reconnected: a new Job completes
  job sel-after-restart "after restart" kwok.oats.dev/run-ms=500
  until_true 120 has_job_cond sel-after-restart Complete
  expect message "$(pod_json sel-after-restart | jq -r '.status.containerStatuses[0].state.terminated.message')" "done: after restart"
}

# a shared environment may hold the objects of an interrupted earlier run
if [ "$WAS_UP" = true ]; then remove_own_objects; fi

check "namespace with PodSecurity restricted" setup_namespace
check "PodSecurity rejects a privileged pod" podsecurity_enforced
check "outcome succeed (default) with OATS_GOAL and run-ms" succeed_with_goal
check "outcome succeed without OATS_GOAL" succeed_default
check "outcome fail with exit-code 3" fail_exit_code
check "outcome oom" oom
check "outcome pending (ImagePullBackOff)" pending_image_pull
check "outcome run, then activeDeadlineSeconds=1" run_then_deadline
check "kubectl logs of a kwok pod (Logs object)" pod_logs
check "RBAC and TokenRequest" rbac_and_tokens
check "ValidatingAdmissionPolicy" validating_admission_policy
check "Kueue admits 2 of 3 Jobs (quota cpu 2), visibility API shows the 3rd with its position" kueue_admission_and_positions
check "stop-apiserver / start-apiserver" apiserver_restart
