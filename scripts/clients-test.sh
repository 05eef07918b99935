#!/usr/bin/env bash
# Generated clients against a live server: generates a TypeScript client (openapi-typescript +
# openapi-fetch) and a Python client (openapi-python-client) from openapi/openapi.json, type-checks
# each smoke program strictly against its generated client (tsc --noEmit, mypy --strict), starts
# oats (local backend, one bearer token) and runs both smoke programs against it
# (clients/typescript/src/smoke.ts, clients/python/smoke.py).
#
# Fails on any error, on any type error and on any generator warning: a generator warning means
# the client lost part of the spec (a model, a response) and would fail users silently.
#
# Needs node and npm (clients/typescript: `npm ci` from the committed lock), python3 with venv (the
# pinned generator, httpx, attrs and mypy go into a venv under $OATS_CLIENTS_CACHE, by default
# ~/.cache/oats-clients, never into the repo), curl and openssl. Generated code is git-ignored:
# clients/typescript/src/schema.d.ts and clients/python/generated/.
#
# OATS_SPEC=path generates both clients from another copy of the document (to try a spec change
# before the server makes it); by default, and always in CI, it is openapi/openapi.json.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
spec=${OATS_SPEC:-$root/openapi/openapi.json}
spec=$(realpath "$spec")
export OATS_SPEC=$spec
cache=${OATS_CLIENTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/oats-clients}
artifacts=${OATS_ARTIFACTS_DIR:-target/artifacts}/clients
mkdir -p "$cache" "$artifacts"
artifacts=$(realpath "$artifacts")

for tool in node npm python3 curl openssl cargo; do
  command -v "$tool" >/dev/null || { echo "clients-test: $tool is missing" >&2; exit 1; }
done

failures=()
fail() { failures+=("$1"); echo "clients-test: FAIL: $1" >&2; }
section() { printf '\n== %s\n' "$1"; }

# --- TypeScript: install from the lock, generate, type-check --------------------------------------
section "typescript: npm ci, generate src/schema.d.ts, tsc --noEmit"
ts=clients/typescript
(cd "$ts" && npm ci --no-audit --no-fund --loglevel=error) || { echo "clients-test: npm ci failed in $ts" >&2; exit 1; }
rm -f "$ts/src/schema.d.ts"
if (cd "$ts" && node_modules/.bin/openapi-typescript "$spec" --output src/schema.d.ts) > "$artifacts/openapi-typescript.log" 2>&1; then
  cat "$artifacts/openapi-typescript.log"
  # It prints its banner and one line per file written; anything else is a warning.
  if grep -v -e '^✨ openapi-typescript ' -e '^🚀 .* → src/schema.d.ts \[' -e '^\s*$' "$artifacts/openapi-typescript.log"; then
    fail "openapi-typescript warned (lines above)"
  fi
else
  cat "$artifacts/openapi-typescript.log" >&2
  fail "openapi-typescript failed"
fi
ts_ready=false
if [ -f "$ts/src/schema.d.ts" ]; then
  if (cd "$ts" && node_modules/.bin/tsc --noEmit -p .); then
    echo "tsc --noEmit (strict): ok"
    ts_ready=true
  else
    fail "tsc: the TypeScript smoke program does not fit the generated types"
  fi
fi

# --- Python: pinned venv, generate, type-check ----------------------------------------------------
section "python: venv, openapi-python-client generate, mypy --strict"
py=clients/python
venv=$cache/python-venv
stamp="$(sha256sum "$py/requirements.txt" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version)')"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$py/requirements.txt"
  "$venv/bin/python" -m pip check
  echo "$stamp" > "$venv/.stamp"
fi
generated=$root/$py/generated
rm -rf "$generated"
mkdir -p "$generated"
# The generator's post-hooks run ruff, which must be on PATH (it is in the venv).
gen_status=0
(cd "$generated" && PATH="$venv/bin:$PATH" openapi-python-client generate --path "$spec" \
  --config "$root/$py/config.yaml" --output-path "$generated/oats-client" --fail-on-warning) \
  > "$artifacts/openapi-python-client.log" 2>&1 || gen_status=$?
cat "$artifacts/openapi-python-client.log"
# A clean run prints exactly "Generating <path>"; anything else is a warning (or worse).
if [ "$gen_status" -ne 0 ] || grep -v -e '^Generating ' -e '^\s*$' "$artifacts/openapi-python-client.log" > /dev/null; then
  fail "openapi-python-client warned or failed (exit $gen_status, output above): the Python client is lossy"
fi
py_ready=false
if [ -d "$generated/oats-client/oats_client" ]; then
  if (cd "$py" && PYTHONPATH="$generated/oats-client" "$venv/bin/mypy" --strict --cache-dir "$cache/mypy" \
        smoke.py "$generated/oats-client/oats_client"); then
    py_ready=true
  else
    fail "mypy --strict: the Python smoke program or the generated client has type errors"
  fi
fi

# --- Both smoke programs against a live server ----------------------------------------------------
section "live server"
. scripts/lib/test-server.sh
start_test_server clients
test_server_cleanup_extra() {
  if [ ${#failures[@]} -gt 0 ] && [ -f "$OATS_TEST_WORK/server.log" ]; then cp "$OATS_TEST_WORK/server.log" "$artifacts/server.log"; fi
}

section "typescript smoke (clients/typescript/src/smoke.ts)"
if $ts_ready; then
  (cd "$ts" && node_modules/.bin/tsx src/smoke.ts) || fail "the TypeScript smoke test failed"
else
  fail "the TypeScript smoke test did not run (see above)"
fi

section "python smoke (clients/python/smoke.py)"
if $py_ready; then
  (cd "$py" && PYTHONPATH="$generated/oats-client" "$venv/bin/python" smoke.py) || fail "the Python smoke test failed"
else
  fail "the Python smoke test did not run (see above)"
fi

check_test_server clients-test || fail "the server misbehaved during the run"

section "summary"
if [ ${#failures[@]} -gt 0 ]; then
  printf 'clients-test: FAILED:\n' >&2
  printf '  - %s\n' "${failures[@]}" >&2
  echo "clients-test: generator output and the server log are in $artifacts" >&2
  exit 1
fi
echo "clients-test: both generated clients fit the spec and the live server"
