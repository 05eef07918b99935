#!/usr/bin/env bash
# testenv/cycle-test.sh [N]: N `testenv.sh up` / `down` cycles in a row (default 30), alternating
# a fresh directory (odd cycles) and the directory of the cycle before, brought down and used
# again (even cycles). Each cycle checks that
#   - `up` succeeds (every component started and answered its health endpoint, node Ready, SA),
#   - `status` reports every component running,
#   - the cluster works: a Job is scheduled, "run" by kwok and completes (controller-manager,
#     scheduler and kwok at work),
#   - `down` stops every process that `up` started.
# Stops at the first failure, prints that cycle's component logs and exits 1 (the directory is
# kept). Ends with "N passed, 0 failed". Needs what testenv.sh needs, plus kubectl.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TE="$HERE/testenv.sh"
N=${1:-30}
case "$N" in ''|*[!0-9]*) echo "usage: $0 [N]" >&2; exit 2 ;; esac
KUBECTL=${KUBECTL:-kubectl}
command -v "$KUBECTL" >/dev/null || { echo "cycle-test: kubectl is missing" >&2; exit 1; }

BASE=$(mktemp -d /tmp/oats-cycle.XXXXXX)
CURRENT=""
passed=0

on_exit() {
  local rc=$?
  if [ -n "$CURRENT" ]; then OATS_TESTENV_DIR=$CURRENT "$TE" down >/dev/null 2>&1 || true; fi
  if [ "$rc" -eq 0 ]; then rm -rf "$BASE"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "cycle-test: FAIL in cycle $i/$N ($kind directory $DIR): $*" >&2
  OATS_TESTENV_DIR=$DIR "$TE" logs >&2 || true
  echo "cycle-test: kept $BASE for inspection" >&2
  echo "$passed passed, 1 failed"
  exit 1
}

# gone <pid> <starttime>: that process no longer runs (a zombie awaiting its reaper counts as gone).
gone() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  case "$1" in Z|X|x) return 0 ;; esac
  [ "${20}" != "$2" ]
}

job_complete() {
  [ "$("$KUBECTL" get job -n default cycle -o jsonpath='{.status.succeeded}' 2>/dev/null)" = 1 ]
}

for i in $(seq 1 "$N"); do
  if [ $((i % 2)) -eq 1 ]; then
    kind=fresh
    DIR=$(mktemp -d "$BASE/env.XXXXXX")
  else
    kind=reused   # the previous cycle's directory, brought down at the end of that cycle
  fi
  export OATS_TESTENV_DIR=$DIR
  t0=$(date +%s.%N)
  CURRENT=$DIR
  "$TE" up >"$BASE/up.log" 2>&1 || { cat "$BASE/up.log" >&2; fail "testenv.sh up failed"; }
  t_up=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  "$TE" status >"$BASE/status.log" 2>&1 || { cat "$BASE/status.log" >&2; fail "testenv.sh status: not every component runs"; }

  eval "$("$TE" env)"
  export KUBECONFIG
  "$KUBECTL" create job -n default cycle --image=registry.invalid/oats/cycle:test >/dev/null ||
    fail "could not create a Job"
  deadline=$(( $(date +%s) + 60 ))
  until job_complete; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the Job did not complete within 60 s: $("$KUBECTL" get job,pods -n default -o wide 2>&1)"
    sleep 0.5
  done

  # what `up` started, to check that `down` stops it
  procs=()
  for f in "$DIR"/pids/*.pid; do
    name=$(basename "$f" .pid)
    procs+=("$name:$(cat "$f"):$(cat "$DIR/pids/$name.start" 2>/dev/null || true)")
  done
  [ "${#procs[@]}" -eq 6 ] || fail "expected 6 PID files (5 components and Kueue), found ${#procs[@]}"

  t1=$(date +%s.%N)
  "$TE" down >"$BASE/down.log" 2>&1 || { cat "$BASE/down.log" >&2; fail "testenv.sh down failed"; }
  CURRENT=""
  t_down=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  for p in "${procs[@]}"; do
    IFS=: read -r name pid start <<<"$p"
    gone "$pid" "$start" || fail "$name (pid $pid) still runs after down"
  done

  passed=$((passed + 1))
  echo "cycle $i/$N ok ($kind directory): up ${t_up}s, Job completed, down ${t_down}s"
done

echo "cycle-test: $passed/$N up/down cycles passed"
echo "$passed passed, 0 failed"
