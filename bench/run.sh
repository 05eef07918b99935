#!/usr/bin/env bash
# Build the server and the benchmark program (the bench/ crate) in release mode, then run the benchmark suite
# (issue 7). Arguments go to oats-bench, e.g. `bench/run.sh --scenarios 1,5 --duration 5`;
# with none, every scenario runs (~4 minutes on 2 cores) and bench/results.md is rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p oats -p oats-bench
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--all)
exec "${CARGO_TARGET_DIR:-target}/release/oats-bench" "${args[@]}"
