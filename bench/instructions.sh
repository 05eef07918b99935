#!/usr/bin/env bash
# Instructions per GET /api/v1/jobs/{id} of the OATS server process (valgrind's callgrind), with
# tracing off, with reads sampled as shipped (5%), and with every request traced: a deterministic
# figure next to oats-bench's throughput ratios, which drift with the shared machine's load.
# Needs valgrind and python3 (the OTLP/HTTP sink); builds the release binaries like bench/run.sh.
# Usage: bench/instructions.sh [requests-per-second] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-200}
seconds=${2:-6}
command -v valgrind >/dev/null || { echo "bench/instructions.sh: valgrind is not installed" >&2; exit 1; }
cargo build --release -p oats -p oats-bench
release=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/oats-instructions.XXXXXX)
# The sink binds any free port and says which in $work/sink.port.
python3 - "$work/sink.port" <<'PY' &
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
with open(sys.argv[1] + ".partial", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(sys.argv[1] + ".partial", sys.argv[1])
server.serve_forever()
PY
sink=$!
trap 'kill $sink 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do [ -s "$work/sink.port" ] && break; sleep 0.1; done
sink_port=$(cat "$work/sink.port")

measure() {
  local name=$1; shift
  local state="$work/$name" addresses="$work/$name.addresses" addr=
  mkdir -p "$state"
  # Port 0: the server writes the address it got to $addresses.
  env "$@" OATS_BACKEND=local OATS_STATE_DIR="$state" OATS_LOG_FORMAT=json OATS_LISTEN=127.0.0.1:0 \
    OATS_ADDRESSES_FILE="$addresses" \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.out" \
    "$release/oats" serve >"$work/$name.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 120); do
    [ -s "$addresses" ] && addr=$(awk '$1 == "api" {print $2}' "$addresses") && curl -fs "$addr/healthz" >/dev/null && break
    sleep 0.5
  done
  local id
  id=$(curl -fs -XPOST "$addr/api/v1/jobs" -H 'content-type: application/json' \
    -d '{"goal":"count instructions","max_turns":2,"labels":{"team":"a"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  sleep 3
  # Warm-up, then count only the measured requests.
  "$release/oats-bench" probe --addr $addr --path "/api/v1/jobs/$id" --rate 100 --seconds 2 >/dev/null
  callgrind_control -i on $server >/dev/null
  "$release/oats-bench" probe --addr $addr --path "/api/v1/jobs/$id" --rate "$rate" --seconds "$seconds" \
    >"$work/$name.probe"
  sleep 6 # one batch export (every 5 s) of the spans
  callgrind_control -i off $server >/dev/null
  callgrind_control -d $server >/dev/null
  kill $server; wait $server 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$work/$name.out".1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  echo $((total / (rate * seconds)))
}

off=$(measure off)
sampled=$(measure sampled OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port \
  OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.05)
always=$(measure always OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$sink_port OTEL_TRACES_SAMPLER=always_on)
echo "instructions per GET job ($((rate * seconds)) requests; server process, all threads):"
echo "  tracing off:                      $off"
echo "  reads sampled 5% (as shipped):    $sampled ($(python3 -c "print(f'{$sampled/$off-1:+.1%}')"))"
echo "  every request traced (always_on): $always ($(python3 -c "print(f'{$always/$off-1:+.1%}')"))"
