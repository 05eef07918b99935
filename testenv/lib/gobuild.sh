# Sourced by netpol.sh and helm.sh: build one command of a Go module at a pinned version into the
# test-tool cache, once, under a lock, with GOTOOLCHAIN=local and `nice`.
#
#   gobuild_cached NAME TOOL MODULE VERSION BUILD_FN
#       Prints nothing; leaves $GOBUILD_BIN = $CACHE/bin/NAME-VERSION-<go>/TOOL, building it if
#       missing by calling `BUILD_FN <module source dir> <output path>` inside the lock.
#
# `go install MODULE/cmd/x@VERSION` would also ask the proxy for the module's version list (for a
# deprecation notice), which the proxy refuses here; so the module is downloaded (a no-op when
# cached) and built inside its own directory, with its own go.mod/go.sum as the main module,
# exactly as upstream builds it.
# Needs: CACHE, NICE, and die/log functions in the sourcing script.

gobuild_module_dir() {
  local module=$1 version=$2 json src
  json=$(cd / && GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod go mod download -json "$module@$version") ||
    die "go mod download $module@$version failed: $json"
  src=$(printf '%s\n' "$json" | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p' | head -n1)
  [ -n "$src" ] && [ -f "$src/go.mod" ] || die "go mod download did not report a module directory: $json"
  printf '%s\n' "$src"
}

gobuild_cached() {
  local name=$1 tool=$2 module=$3 version=$4 build=$5 gover dir src start
  command -v go >/dev/null || die "go is not installed (needed to build $module@$version)"
  gover=$(GOTOOLCHAIN=local go env GOVERSION) || die "go env GOVERSION failed"
  dir="$CACHE/bin/$name-$version-$gover"
  GOBUILD_BIN="$dir/$tool"
  [ -x "$GOBUILD_BIN" ] && return 0
  mkdir -p "$dir"
  exec 9>"$CACHE/$name-build.lock"
  flock 9
  if [ ! -x "$GOBUILD_BIN" ]; then   # another process may have built it while we waited
    GOBUILD_TMP=$(mktemp -d "$dir/.build.XXXXXX")
    trap 'rm -rf "${GOBUILD_TMP:-}"' EXIT
    start=$(date +%s)
    log "building $module@$version ($tool) with $gover ..."
    src=$(gobuild_module_dir "$module" "$version")
    "$build" "$src" "$GOBUILD_TMP/$tool" || die "go build of $module@$version failed"
    [ -x "$GOBUILD_TMP/$tool" ] || die "go build of $module@$version produced no $tool binary"
    mv -f "$GOBUILD_TMP/$tool" "$GOBUILD_BIN"
    log "built $GOBUILD_BIN in $(( $(date +%s) - start ))s"
  fi
  flock -u 9
}

# `go build` of one package directory of a downloaded module: gobuild_go SRC PKGDIR OUT LDFLAGS
gobuild_go() {
  (cd "$1" && GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly \
    nice -n "$NICE" go build -trimpath -ldflags "$4" -o "$3" "$2" >&2)
}
