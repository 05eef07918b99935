# Sourced by the fuzz, client and browser test scripts: builds oats and starts a local-backend
# server on a free loopback port with one admin bearer token.
#
#   . scripts/lib/test-server.sh
#   start_test_server NAME      # sets OATS_URL, OATS_TOKEN, OATS_SERVER_PID, OATS_TEST_WORK
#   check_test_server NAME      # fails if the server died, panicked or logged the token
#
# The EXIT trap it installs stops the server and removes the work directory; scripts that need
# their own cleanup add it to the function `test_server_cleanup_extra`.

test_server_cleanup_extra() { :; }

test_server_cleanup() {
  test_server_cleanup_extra || true
  if [ -n "${OATS_SERVER_PID:-}" ]; then
    kill "$OATS_SERVER_PID" 2>/dev/null || true
    wait "$OATS_SERVER_PID" 2>/dev/null || true
  fi
  if [ -n "${OATS_TEST_WORK:-}" ]; then rm -rf "$OATS_TEST_WORK"; fi
}

start_test_server() {
  local name=$1 port hash
  cargo build --quiet --locked
  OATS_TEST_WORK=$(mktemp -d "/tmp/oats-$name.XXXXXX")
  trap test_server_cleanup EXIT
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  OATS_TOKEN=$(openssl rand -hex 24)
  hash=$(printf %s "$OATS_TOKEN" | target/debug/oats hash-token)
  printf 'tokens:\n  - {name: %s, sha256: %s, tenant: %s, role: admin}\n' "$name" "$hash" "$name" \
    > "$OATS_TEST_WORK/tokens.yaml"

  # Demo agents take 200 ms a turn by default (OATS_TEST_TURN_DELAY_MS): a job with many turns
  # stays running long enough to cancel.
  OATS_BACKEND=local OATS_STATE_DIR="$OATS_TEST_WORK/state" OATS_AUTH_TOKENS_FILE="$OATS_TEST_WORK/tokens.yaml" \
    OATS_LOG_FORMAT=json OATS_DEMO_TURN_DELAY_MS="${OATS_TEST_TURN_DELAY_MS:-200}" \
    OATS_LOCAL_ENV_ALLOWLIST=PATH,OATS_DEMO_TURN_DELAY_MS \
    target/debug/oats serve --listen "127.0.0.1:$port" > "$OATS_TEST_WORK/server.log" 2>&1 &
  OATS_SERVER_PID=$!
  OATS_URL="http://127.0.0.1:$port"
  export OATS_URL OATS_TOKEN

  local _
  for _ in $(seq 1 100); do
    if curl -fs "$OATS_URL/readyz" > /dev/null; then
      echo "$name: oats is serving on $OATS_URL (log: $OATS_TEST_WORK/server.log)"
      return 0
    fi
    kill -0 "$OATS_SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name: the server did not become ready" >&2
  tail -50 "$OATS_TEST_WORK/server.log" >&2
  return 1
}

check_test_server() {
  local name=$1
  if ! kill -0 "$OATS_SERVER_PID" 2>/dev/null; then
    echo "$name: the server died during the run" >&2; tail -50 "$OATS_TEST_WORK/server.log" >&2; return 1
  fi
  if grep -q panicked "$OATS_TEST_WORK/server.log"; then
    echo "$name: the server panicked" >&2; grep -B2 -A10 panicked "$OATS_TEST_WORK/server.log" >&2; return 1
  fi
  if grep -qF "$OATS_TOKEN" "$OATS_TEST_WORK/server.log"; then
    echo "$name: the bearer token appears in the server log" >&2; return 1
  fi
}
