#!/usr/bin/env bash
# Prints the path of np-guard's offline NetworkPolicy analyzer (`netpolicy`, the CLI of
# github.com/np-guard/netpol-analyzer), building it from its Go module first if it is not cached.
# tests/netpol.rs runs it over the rendered infra/base; by hand:
#
#   np=$(testenv/netpol.sh)
#   "$np" list --dirpath DIR              # every allowed connection
#   "$np" eval --dirpath DIR -n oats -s SRC-POD --destination-ip 169.254.169.254 -p 80
#
# The binary is cached next to the control-plane binaries of testenv.sh, keyed by version and Go
# toolchain: ${OATS_TESTENV_CACHE:-$HOME/.cache/oats-testenv}/bin/netpol-analyzer-<version>-<go>/.
# The version is pinned (the module proxy does not serve this module's @v/list here);
# override with OATS_NETPOL_ANALYZER_VERSION=vX.Y.Z. Needs `go` >= 1.23 (the module says
# `go 1.23.0`, no replace directives); builds with GOTOOLCHAIN=local under `nice`
# (OATS_TESTENV_NICE, default 15), like testenv.sh. Cold build: module download + compile,
# a few minutes on 2 cores.
set -euo pipefail

MODULE=github.com/np-guard/netpol-analyzer
PKG=$MODULE/cmd/netpolicy
VERSION=${OATS_NETPOL_ANALYZER_VERSION:-v1.4.4}
CACHE=${OATS_TESTENV_CACHE:-${HOME:-/root}/.cache/oats-testenv}
NICE=${OATS_TESTENV_NICE:-15}

die() { echo "netpol: ERROR: $*" >&2; exit 1; }
log() { echo "netpol: $*" >&2; }

command -v go >/dev/null || die "go is not installed (needed to build $PKG@$VERSION)"
gover=$(GOTOOLCHAIN=local go env GOVERSION) || die "go env GOVERSION failed"
dir="$CACHE/bin/netpol-analyzer-$VERSION-$gover"
bin="$dir/netpolicy"

if [ ! -x "$bin" ]; then
  mkdir -p "$dir"
  exec 9>"$CACHE/netpol-build.lock"
  flock 9
  if [ ! -x "$bin" ]; then   # another process may have built it while we waited
    tmp=$(mktemp -d "$dir/.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    start=$(date +%s)
    log "building $PKG@$VERSION with $gover ..."
    # `go install $PKG@$VERSION` would also ask the proxy for the module's version list (to look
    # for a deprecation notice), which the proxy refuses here; so download the module (a no-op
    # when cached) and build inside it: the main module is then netpol-analyzer itself, with its
    # own go.mod/go.sum, exactly as upstream builds it.
    json=$(cd / && GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION") ||
      die "go mod download $MODULE@$VERSION failed: $json"
    src=$(printf '%s\n' "$json" | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p' | head -n1)
    [ -n "$src" ] && [ -f "$src/go.mod" ] || die "go mod download did not report a module directory: $json"
    if ! (cd "$src" && GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly \
            nice -n "$NICE" go build -trimpath -ldflags "-s -w" -o "$tmp/netpolicy" ./cmd/netpolicy >&2); then
      die "go build of $PKG@$VERSION failed"
    fi
    [ -x "$tmp/netpolicy" ] || die "go build of $PKG@$VERSION produced no netpolicy binary"
    mv -f "$tmp/netpolicy" "$bin"
    log "built $bin in $(( $(date +%s) - start ))s"
  fi
  flock -u 9
fi

"$bin" --help >/dev/null 2>&1 || die "$bin does not run (delete $dir to rebuild)"
echo "$bin"
