#!/usr/bin/env bash
# Prints the paths of the prometheus-operator CRDs that infra/monitoring needs
# (monitoring.coreos.com ServiceMonitor and PrometheusRule), one per line, downloading the
# prometheus-operator Go module into the Go module cache first if it is not there yet.
#
#   kubectl apply --server-side -f "$(testenv/crds.sh | sed -n 1p)" -f "$(testenv/crds.sh | sed -n 2p)"
#   mapfile -t crds < <(testenv/crds.sh); kubectl apply --server-side "${crds[@]/#/-f}"
#
# The version is pinned (the module proxy's @latest/list answer lags behind the releases);
# override with OATS_PROMETHEUS_OPERATOR_VERSION=vX.Y.Z. Needs `go` (installed for testenv/).
set -euo pipefail

MODULE=github.com/prometheus-operator/prometheus-operator
VERSION=${OATS_PROMETHEUS_OPERATOR_VERSION:-v0.94.0}
CRD_DIR=example/prometheus-operator-crd
FILES=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml)

die() { echo "crds: ERROR: $*" >&2; exit 1; }
command -v go >/dev/null || die "go is not installed (needed to fetch $MODULE from the Go module proxy)"

# Outside any module (the repo's testenv/modules/* are modules of their own), local toolchain,
# read-only module cache as usual. `go mod download -json` is a no-op when the module is cached.
json=$(cd / && GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION") ||
  die "go mod download $MODULE@$VERSION failed: $json"
dir=$(printf '%s\n' "$json" | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p' | head -n1)
[ -n "$dir" ] && [ -d "$dir" ] || die "go mod download did not report a module directory: $json"

for f in "${FILES[@]}"; do
  path="$dir/$CRD_DIR/$f"
  [ -f "$path" ] || die "$path is missing (did the layout of $MODULE@$VERSION change?)"
  echo "$path"
done
