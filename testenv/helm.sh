#!/usr/bin/env bash
# Prints the path of a `helm` (v3) binary, building it from its Go module (helm.sh/helm/v3,
# ./cmd/helm) first if it is not cached. tests/helm.rs runs it over the chart in infra/helm/oats;
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
command -v go >/dev/null || die "go is not installed (needed to build $MODULE/cmd/helm@$VERSION)"
gover=$(GOTOOLCHAIN=local go env GOVERSION) || die "go env GOVERSION failed"
dir="$CACHE/bin/helm-$VERSION-$gover"
bin="$dir/helm"

if [ ! -x "$bin" ]; then
  mkdir -p "$dir"
  exec 9>"$CACHE/helm-build.lock"
  flock 9
  if [ ! -x "$bin" ]; then   # another process may have built it while we waited
    tmp=$(mktemp -d "$dir/.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    start=$(date +%s)
    log "building $MODULE/cmd/helm@$VERSION with $gover ..."
    # As in netpol.sh: `go install $MODULE/cmd/helm@$VERSION` would also ask the proxy for the
    # module's version list, which the proxy may refuse; so download the module (a no-op when
    # cached) and build inside it, with helm's own go.mod/go.sum as the main module.
    json=$(cd / && GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION") ||
      die "go mod download $MODULE@$VERSION failed: $json"
    src=$(printf '%s\n' "$json" | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p' | head -n1)
    [ -n "$src" ] && [ -f "$src/go.mod" ] || die "go mod download did not report a module directory: $json"
    # helm's Makefile: Kubernetes version = client-go v0.<minor>.x -> 1.<minor>.
    k8s_minor=$(sed -nE 's|^[[:space:]]*k8s\.io/client-go v0\.([0-9]+)\..*|\1|p' "$src/go.mod" | head -n1)
    [ -n "$k8s_minor" ] || die "cannot find the k8s.io/client-go version in $src/go.mod"
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION"
    ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
      ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
    done
    if ! (cd "$src" && GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly \
            nice -n "$NICE" go build -trimpath -ldflags "$ldflags" -o "$tmp/helm" ./cmd/helm >&2); then
      die "go build of $MODULE/cmd/helm@$VERSION failed"
    fi
    [ -x "$tmp/helm" ] || die "go build of $MODULE/cmd/helm@$VERSION produced no helm binary"
    mv -f "$tmp/helm" "$bin"
    log "built $bin in $(( $(date +%s) - start ))s"
  fi
  flock -u 9
fi

"$bin" version --short >/dev/null 2>&1 || die "$bin does not run (delete $dir to rebuild)"
echo "$bin"
