#!/usr/bin/env bash
# Hostile-input testing of the live server against its own OpenAPI document: schemathesis
# generates valid and invalid requests for every operation (authenticated), and fails on any 5xx,
# any response that breaks the spec (status, content type, schema, headers), or a crash.
# Which checks run, and why two are relaxed: scripts/schemathesis.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || { echo 'fuzz-api: schemathesis is missing (eval "$(scripts/install-test-tools.sh)" installs it and puts it on PATH)' >&2; exit 1; }

. scripts/lib/test-server.sh
OATS_TEST_TURN_DELAY_MS=10 start_test_server fuzz

status=0
schemathesis --config-file scripts/schemathesis.toml run "$OATS_URL/openapi.json" \
  --header "Authorization: Bearer $OATS_TOKEN" \
  --max-examples "${OATS_FUZZ_EXAMPLES:-50}" || status=$?
check_test_server fuzz-api || status=1
exit "$status"
