#!/usr/bin/env bash
# The whole test suite, as README.md and CI (.ci/run) run it. On a fresh Debian machine with the
# toolchains (Rust, Go, Python 3, Node) this alone is enough:
#   0. scripts/install-test-tools.sh installs what is missing (Debian packages, PostgreSQL,
#      schemathesis, the openai venv for OATS_TEST_PYTHON, kubectl); a second run installs nothing;
#      then a throwaway PostgreSQL on 127.0.0.1 (scripts/lib/postgres.sh) with databases oats_test
#      and oats_test2 (OATS_TEST_DATABASE_URL, OATS_TEST_DATABASE_URL2), always, for the whole run;
#   1. against live servers: schemathesis with the server's own OpenAPI document
#      (scripts/fuzz-api.sh), generated TypeScript and Python clients (scripts/clients-test.sh),
#      and Swagger UI in headless Chromium (scripts/swagger-ui-test.sh);
#   2. the test control plane (testenv/testenv.sh up: built once from Go modules, cached) and its
#      self-test (testenv/selftest.sh, which leaves it up);
#   3. a build of the benchmark crate (bench/), then cargo test: unit tests (the bench's too), the OpenAPI drift
#      check, HTTP end-to-end tests on the local backend, telemetry, security and monitoring
#      tests, and end-to-end tests of the Kubernetes backend against that control plane.
# Locally, OATS_SKIP_KUBE_E2E=1 skips the control plane and the test binaries that need it
# (tests/kube/main.rs and tests/kube_*.rs), and the summary at the end names them; CI never does.
# The summary also counts the passed, failed and ignored tests and lists each ignored test with
# its reason.
# It starts with `cargo fmt --check` and `cargo clippy -D warnings`; either failing fails the run.
# Everything this script starts (PostgreSQL, the control plane) is stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { [ -n "${CI:-}" ] && [ "${CI}" != "false" ]; }

# Formatting and lints first, over every crate of the workspace: they fail in a minute, before
# the long suites.
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

tools_env=$(scripts/install-test-tools.sh)
eval "$tools_env"
export OATS_TEST_PYTHON

. scripts/lib/postgres.sh

testenv_started=false
cleanup() {
  local rc=$?
  if [ "$testenv_started" = true ]; then testenv/testenv.sh down || true; fi
  test_postgres_stop || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

test_postgres_start

scripts/fuzz-api.sh
scripts/clients-test.sh
scripts/swagger-ui-test.sh

kube_enabled=false
if in_ci || [ "${OATS_SKIP_KUBE_E2E:-}" != "1" ]; then
  kube_enabled=true
  unset OATS_SKIP_KUBE_E2E
  export OATS_TESTENV_DIR="${OATS_TESTENV_DIR:-$(mktemp -d /tmp/oats-testenv.XXXXXX)}"
  testenv_started=true
  if ! testenv/testenv.sh up; then
    echo "scripts/test.sh: the test control plane did not start" >&2
    testenv/testenv.sh logs || true
    exit 1
  fi
  eval "$(testenv/testenv.sh env)"
  # The control plane's own checks (Job outcomes, PodSecurity, RBAC, TokenRequest, VAP, an
  # apiserver restart); it leaves the environment up and removes what it created.
  if ! testenv/selftest.sh; then
    echo "scripts/test.sh: testenv/selftest.sh failed" >&2
    exit 1
  fi
fi

# The benchmark (bench/, a member of the workspace) is built by no test target: it must compile.
cargo build --locked -p oats-bench

targets=(--all-targets)
not_run=()
if [ "$kube_enabled" = false ]; then
  targets=(--lib --bins --examples --benches)
  # A test binary is tests/NAME.rs or tests/NAME/main.rs.
  for file in tests/*.rs tests/*/main.rs; do
    name=$(basename "${file%/main.rs}" .rs)
    case "$name" in
      kube | kube_*) not_run+=("$name") ;;
      *) targets+=(--test "$name") ;;
    esac
  done
fi

cargo_log=$(mktemp /tmp/oats-cargo-test.XXXXXX)
summary() {
  echo "== scripts/test.sh summary =="
  grep -E '^test result:' "$cargo_log" |
    awk '{p += $4; f += $6; i += $8} END {printf "%d passed, %d failed, %d ignored\n", p, f, i}'
  grep -E '^test .* \.\.\. ignored' "$cargo_log" | sed 's/^test /  ignored: /' || true
  if [ "${#not_run[@]}" -gt 0 ]; then
    echo "  not run (OATS_SKIP_KUBE_E2E=1, no control plane): ${not_run[*]}"
  fi
}

# The benchmark crate's own unit tests (its statistics) run with the rest.
if ! { cargo test --locked "${targets[@]}" && cargo test --locked -p oats-bench; } 2>&1 | tee "$cargo_log"; then
  summary
  if [ -n "${OATS_TESTENV_DIR:-}" ]; then testenv/testenv.sh logs || true; fi
  exit 1
fi
summary
