#!/usr/bin/env bash
# Prints the path of np-guard's offline NetworkPolicy analyzer (`netpolicy`, the CLI of
# github.com/np-guard/netpol-analyzer), building it from its Go module first if it is not cached.
# tests/artefacts/netpol.rs runs it over the rendered infra/base; by hand:
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

. "$(dirname "$0")/lib/gobuild.sh"
build_netpolicy() { gobuild_go "$1" ./cmd/netpolicy "$2" "-s -w"; }
gobuild_cached netpol-analyzer netpolicy "$MODULE" "$VERSION" build_netpolicy
bin=$GOBUILD_BIN
dir=$(dirname "$bin")

"$bin" --help >/dev/null 2>&1 || die "$bin does not run (delete $dir to rebuild)"
echo "$bin"
