#!/usr/bin/env bash
# Regenerate what is generated from the code: the OpenAPI documents and README's configuration table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
target/debug/oats openapi > openapi/openapi.json
target/debug/oats openapi --yaml > openapi/openapi.yaml
table=$(HOME=/home/user XDG_DATA_HOME= target/debug/oats config | sed 's|/home/user/.local/share/oats|~/.local/share/oats|')
python3 - "$table" <<'PY'
import sys
table = sys.argv[1].strip()
path = "README.md"
text = open(path).read()
start = text.index("| key | environment variable |")
end = text.index("\n\n", start)
open(path, "w").write(text[:start] + table + text[end:])
PY
