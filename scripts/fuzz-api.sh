#!/usr/bin/env bash
# Hostile-input testing of the live server against its own OpenAPI document: schemathesis
# generates valid and invalid requests for every operation (authenticated), and fails on any 5xx,
# any response that breaks the spec (status, content type, schema, headers), or a crash.
#
# One check is left out: positive_data_acceptance, which expects every schema-valid request to
# succeed. The server rightly answers some of them 422 (a label selector with a 70-character key,
# a whitespace-only goal) or 400 (a page token it never issued), and the spec documents both.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || { echo "fuzz-api: schemathesis is missing (pip install schemathesis==4.32.5)" >&2; exit 1; }
cargo build --quiet --locked

work=$(mktemp -d /tmp/oats-fuzz.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token=$(openssl rand -hex 24)
printf 'tokens:\n  - {name: fuzz, sha256: %s, tenant: fuzz, role: admin}\n' "$(printf %s "$token" | target/debug/oats hash-token)" > "$work/tokens.yaml"

OATS_BACKEND=local OATS_STATE_DIR="$work/state" OATS_AUTH_TOKENS_FILE="$work/tokens.yaml" OATS_LOG_FORMAT=json \
  OATS_DEMO_TURN_DELAY_MS=10 OATS_LOCAL_ENV_ALLOWLIST=PATH,OATS_DEMO_TURN_DELAY_MS \
  target/debug/oats serve --listen "127.0.0.1:$port" > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT

for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" > /dev/null && break
  sleep 0.1
done

status=0
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "${OATS_FUZZ_EXAMPLES:-50}" || status=$?

if ! kill -0 "$server" 2>/dev/null; then
  echo "fuzz-api: the server died during the run" >&2; tail -50 "$work/server.log" >&2; exit 1
fi
if grep -q panicked "$work/server.log"; then
  echo "fuzz-api: the server panicked" >&2; grep -B2 -A10 panicked "$work/server.log" >&2; exit 1
fi
if grep -q "$token" "$work/server.log"; then
  echo "fuzz-api: the bearer token appears in the server log" >&2; exit 1
fi
exit "$status"
