#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine that already has the toolchains
# (Rust, Go, Python 3, Node + npm). scripts/test.sh runs it first; CI (.ci/run) runs
# scripts/test.sh. Idempotent: when everything is there it installs nothing and only says so.
#
#   eval "$(scripts/install-test-tools.sh)"
#
# Everything it says goes to stderr; stdout is only `export ...` lines for the caller's shell:
#   PATH               with the schemathesis venv's bin (and a built kubectl) if they were needed
#   OATS_TEST_PYTHON   a Python with openai==3.51.0 (venv at ${OATS_PY_VENV:-~/.cache/oats-py})
#
# What it installs, each only when missing:
#   Debian packages  jq, iproute2 (ss), util-linux (flock, runuser), curl, openssl, procps (pgrep),
#                    prometheus (promtool; its server for the live dashboard test), python3-yaml,
#                    chromium + fonts-dejavu-core (Swagger UI test), python3-venv, postgresql (initdb/pg_ctl/postgres for scripts/lib/postgres.sh)
#   PyPI             schemathesis==4.32.5 in its own venv (${OATS_SCHEMATHESIS_VENV:-~/.cache/oats-schemathesis}),
#                    unless a schemathesis is already on PATH;
#                    openai==3.51.0 in ${OATS_PY_VENV:-~/.cache/oats-py}
#   Go modules       kubectl, built from testenv/modules/k8s, if the machine has none
# (npm packages and the generated clients' Python packages are installed by the scripts that use
# them, from their locks; the control plane's binaries by testenv/testenv.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

SCHEMATHESIS_VERSION=4.32.5
OPENAI_VERSION=3.51.0
CACHE_HOME=${XDG_CACHE_HOME:-$HOME/.cache}
PY_VENV=${OATS_PY_VENV:-$CACHE_HOME/oats-py}
ST_VENV=${OATS_SCHEMATHESIS_VENV:-$CACHE_HOME/oats-schemathesis}
PG_VERSION=15

path_prepend() { case ":$PATH:" in *":$1:"*) ;; *) PATH="$1:$PATH" ;; esac; }
say() { echo "install-test-tools: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
installed=0

main() {
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
  local tool
  for tool in cargo go python3 node npm; do
    command -v "$tool" >/dev/null || die "$tool is missing on this machine (the toolchains are not installed by this script)"
  done

  mkdir -p "$CACHE_HOME"
  # Two test runs at once must not install the same things concurrently.
  exec 8>"$CACHE_HOME/oats-install-test-tools.lock"
  flock 8

  debian_packages
  schemathesis_venv
  openai_venv
  kubectl_binary

  if [ "$installed" -eq 0 ]; then say "everything is already installed"; else say "done"; fi
}

# --- Debian packages ------------------------------------------------------------------------------
debian_packages() {
  local need=() sudo=()
  command -v jq >/dev/null || need+=(jq)
  command -v ss >/dev/null || need+=(iproute2)
  { command -v flock >/dev/null && command -v runuser >/dev/null; } || need+=(util-linux)
  command -v curl >/dev/null || need+=(curl)
  command -v openssl >/dev/null || need+=(openssl)
  command -v pgrep >/dev/null || need+=(procps)
  # alert-rule tests (promtool), live dashboard test (the prometheus server, same package)
  { command -v promtool >/dev/null && { command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ]; }; } ||
    need+=(prometheus)
  python3 -c 'import yaml' 2>/dev/null || /usr/bin/python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
  [ -x /usr/bin/chromium ] || need+=(chromium)                         # Swagger UI in a real browser
  fc-list 2>/dev/null | grep -qi dejavu || need+=(fonts-dejavu-core)
  # venv creation needs ensurepip (Debian ships it in python3-venv)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  # A throwaway PostgreSQL server per test run (scripts/lib/postgres.sh)
  local pgbin=/usr/lib/postgresql/$PG_VERSION/bin
  { [ -x "$pgbin/initdb" ] && [ -x "$pgbin/pg_ctl" ] && [ -x "$pgbin/postgres" ] && [ -x "$pgbin/psql" ]; } ||
    need+=(postgresql)
  [ ${#need[@]} -gt 0 ] || return 0

  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "Debian packages are missing (${need[*]}) and this is not root (no sudo either)"
    sudo=(sudo -n)
  fi
  say "installing Debian packages: ${need[*]}"
  local aptlog
  aptlog=$(mktemp /tmp/oats-apt.XXXXXX.log)
  if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$aptlog" 2>&1; then
    tail -n 40 "$aptlog" >&2
    die "apt-get install ${need[*]} failed (full log: $aptlog)"
  fi
  rm -f "$aptlog"
  installed=1
  hash -r
}

# venv_has <venv> <distribution> <version>: the venv's Python imports and has exactly that version.
venv_has() {
  [ -x "$1/bin/python" ] &&
    "$1/bin/python" - "$2" "$3" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
EOF
}

# make_venv <venv> <requirement>: (re)create the venv and pip-install the requirement from PyPI.
make_venv() {
  local venv=$1 req=$2
  say "creating the Python venv $venv with $req"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$req" >&2 ||
    die "pip install $req into $venv failed"
  installed=1
}

# --- schemathesis (PyPI): fuzzes the live API against its own spec --------------------------------
schemathesis_venv() {
  if command -v schemathesis >/dev/null && [ "$(command -v schemathesis)" != "$ST_VENV/bin/schemathesis" ]; then
    return 0   # the machine has its own
  fi
  venv_has "$ST_VENV" schemathesis "$SCHEMATHESIS_VERSION" ||
    make_venv "$ST_VENV" "schemathesis==$SCHEMATHESIS_VERSION"
  # Only the schemathesis entry point goes on PATH, not the venv's python/pip.
  mkdir -p "$ST_VENV/path"
  ln -sf ../bin/schemathesis "$ST_VENV/path/schemathesis"
  path_prepend "$ST_VENV/path"
  command -v schemathesis >/dev/null || die "schemathesis is not runnable from $ST_VENV"
}

# --- the Python the Rust tests run (OATS_TEST_PYTHON) ---------------------------------------------
openai_venv() {
  venv_has "$PY_VENV" openai "$OPENAI_VERSION" || make_venv "$PY_VENV" "openai==$OPENAI_VERSION"
  "$PY_VENV/bin/python" -c 'import openai' 2>/dev/null || die "$PY_VENV/bin/python cannot import openai"
  OATS_TEST_PYTHON=$PY_VENV/bin/python
}

# --- kubectl (with kustomize) renders and applies infra/ ------------------------------------------
kubectl_binary() {
  command -v kubectl >/dev/null && return 0
  local bin="${OATS_TESTENV_CACHE:-$CACHE_HOME/oats-testenv}/kubectl"
  if [ ! -x "$bin/kubectl" ]; then
    say "building kubectl from testenv/modules/k8s (Go module proxy)"
    mkdir -p "$bin"
    (cd testenv/modules/k8s &&
      GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off nice -n 15 go build -trimpath -o "$bin/kubectl.tmp.$$" k8s.io/kubernetes/cmd/kubectl) >&2 ||
      { rm -f "$bin/kubectl.tmp.$$"; die "go build of kubectl failed"; }
    mv -f "$bin/kubectl.tmp.$$" "$bin/kubectl"
    installed=1
  fi
  path_prepend "$bin"
}

main
printf 'export PATH=%q\n' "$PATH"
printf 'export OATS_TEST_PYTHON=%q\n' "$OATS_TEST_PYTHON"
