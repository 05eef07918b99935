#!/usr/bin/env bash
# The whole test suite, as README.md and CI run it:
#   1. against live servers: schemathesis with the server's own OpenAPI document
#      (scripts/fuzz-api.sh), generated TypeScript and Python clients (scripts/clients-test.sh),
#      and Swagger UI in headless Chromium (scripts/swagger-ui-test.sh);
#   2. cargo test: unit tests, the OpenAPI drift check, HTTP end-to-end tests on the local
#      backend, telemetry, security and monitoring tests, and end-to-end tests of the Kubernetes
#      backend against a real control plane that testenv/ builds (once, cached) and starts on
#      loopback.
# Locally, OATS_SKIP_KUBE_E2E=1 skips the control plane and the tests that need it; CI never does.
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { [ -n "${CI:-}" ] && [ "${CI}" != "false" ]; }

scripts/fuzz-api.sh
scripts/clients-test.sh
scripts/swagger-ui-test.sh

if in_ci || [ "${OATS_SKIP_KUBE_E2E:-}" != "1" ]; then
  unset OATS_SKIP_KUBE_E2E
  export OATS_TESTENV_DIR="${OATS_TESTENV_DIR:-$(mktemp -d /tmp/oats-testenv.XXXXXX)}"
  trap 'testenv/testenv.sh down || true' EXIT
  if ! testenv/testenv.sh up; then
    echo "scripts/test.sh: the test control plane did not start" >&2
    testenv/testenv.sh logs || true
    exit 1
  fi
  eval "$(testenv/testenv.sh env)"
fi

if ! cargo test --locked --all-targets; then
  if [ -n "${OATS_TESTENV_DIR:-}" ]; then testenv/testenv.sh logs || true; fi
  exit 1
fi
