#!/usr/bin/env bash
# Swagger UI in a real browser: starts oats (local backend, one bearer token) and drives /docs in
# Debian's headless Chromium with playwright-core (clients/browser/swagger-ui.test.mjs):
# Authorize with the token, Try it out on POST /api/v1/jobs, Execute, expect a 201 and a job that
# exists, no request to any host but 127.0.0.1, no script error. Leaves a screenshot at
# ${OATS_ARTIFACTS_DIR:-target/artifacts}/swagger-ui.png.
#
# Needs Debian's chromium (apt-get install chromium; playwright's own browser download is not
# used), node and npm (clients/browser: `npm ci` from the committed lock), curl and openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
chromium=${OATS_CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || { echo "swagger-ui-test: $chromium is missing (apt-get install chromium)" >&2; exit 1; }
for tool in node npm curl openssl cargo python3; do
  command -v "$tool" >/dev/null || { echo "swagger-ui-test: $tool is missing" >&2; exit 1; }
done
export OATS_CHROMIUM=$chromium
mkdir -p "${OATS_ARTIFACTS_DIR:-target/artifacts}"
OATS_ARTIFACTS_DIR=$(realpath "${OATS_ARTIFACTS_DIR:-target/artifacts}")
export OATS_ARTIFACTS_DIR

(cd clients/browser && npm ci --no-audit --no-fund --loglevel=error)

. scripts/lib/test-server.sh
start_test_server swagger-ui

status=0
(cd clients/browser && node swagger-ui.test.mjs) || status=$?
check_test_server swagger-ui-test || status=1
if [ "$status" -ne 0 ]; then
  cp "$OATS_TEST_WORK/server.log" "$OATS_ARTIFACTS_DIR/swagger-ui-server.log" 2>/dev/null || true
  echo "swagger-ui-test: FAILED (screenshots and the server log are in $OATS_ARTIFACTS_DIR)" >&2
fi
exit "$status"
