#!/usr/bin/env bash
# Prints the path of a `helm` (v3) binary, building it from its Go module (helm.sh/helm/v3,
# ./cmd/helm) first if it is not cached. tests/artefacts/helm.rs runs it over the chart in infra/helm/oats;
# by hand:
#
#   helm=$(testenv/helm.sh)
#   "$helm" lint infra/helm/oats
#   "$helm" template oats infra/helm/oats [-f my-values.yaml]
#
# The binary is cached next to the control-plane binaries of testenv.sh, keyed by version and Go
# toolchain: ${OATS_TESTENV_CACHE:-$HOME/.cache/oats-testenv}/bin/helm-<version>-<go>/helm.
# The version is pinned; override with OATS_HELM_VERSION=v3.X.Y (a v3 release: the chart is
# apiVersion v2 and the test relies on v3's `template`/`lint` output). Needs `go` >= 1.26 (the
# module says `go 1.26.0`); builds with GOTOOLCHAIN=local under `nice` (OATS_TESTENV_NICE,
# default 15), like testenv.sh and netpol.sh. The ldflags are those of helm's Makefile: version
# string, and the Kubernetes version that `helm template`/`lint` assume (.Capabilities.KubeVersion)
# derived from the k8s.io/client-go version in helm's go.mod, as upstream does.
# Cold build: module download + compile, several minutes on 2 cores.
set -euo pipefail

MODULE=helm.sh/helm/v3
VERSION=${OATS_HELM_VERSION:-v3.22.0}
CACHE=${OATS_TESTENV_CACHE:-${HOME:-/root}/.cache/oats-testenv}
NICE=${OATS_TESTENV_NICE:-15}

die() { echo "helm: ERROR: $*" >&2; exit 1; }
log() { echo "helm: $*" >&2; }

case "$VERSION" in
  v3.*) ;;
  *) die "OATS_HELM_VERSION must be a v3 release (v3.X.Y), got $VERSION" ;;
esac
. "$(dirname "$0")/lib/gobuild.sh"
# helm's Makefile: version string, and the Kubernetes version `template`/`lint` assume
# (client-go v0.<minor>.x -> 1.<minor>).
build_helm() {
  local src=$1 out=$2 k8s_minor ldflags pkg
  k8s_minor=$(sed -nE 's|^[[:space:]]*k8s\.io/client-go v0\.([0-9]+)\..*|\1|p' "$src/go.mod" | head -n1)
  [ -n "$k8s_minor" ] || die "cannot find the k8s.io/client-go version in $src/go.mod"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  gobuild_go "$src" ./cmd/helm "$out" "$ldflags"
}
gobuild_cached helm helm "$MODULE" "$VERSION" build_helm
bin=$GOBUILD_BIN
dir=$(dirname "$bin")

"$bin" version --short >/dev/null 2>&1 || die "$bin does not run (delete $dir to rebuild)"
echo "$bin"
