#!/usr/bin/env bash
# Checks the Prometheus rules shipped in infra/monitoring/prometheusrule.yaml with promtool:
#   1. extracts .spec of the PrometheusRule (promtool does not read the CRD) to a plain rule file,
#   2. `promtool check rules` on it (syntax, templates, duplicate rules),
#   3. `promtool test rules` on tests/alerts/*.yaml, which name that file `oats.rules.yaml`.
# tests/artefacts/monitoring.rs runs this script, so `cargo test` fails when a rule or a test breaks.
#
# Needs: promtool (Debian: apt-get install --no-install-recommends prometheus; or set
# PROMTOOL=/path/to/promtool) and python3 with PyYAML (Debian: python3-yaml).
# Usage: scripts/check-alerts.sh [--keep]   (--keep leaves the work directory for inspection)
set -euo pipefail
cd "$(dirname "$0")/.."

RULE_CR=infra/monitoring/prometheusrule.yaml
TESTS_DIR=tests/alerts
RULES_NAME=oats.rules.yaml

die() { echo "check-alerts: ERROR: $*" >&2; exit 1; }

promtool=${PROMTOOL:-$(command -v promtool || true)}
[ -n "$promtool" ] && [ -x "$promtool" ] ||
  die "promtool not found: apt-get install -y --no-install-recommends prometheus (or set PROMTOOL)"

# A python3 that has PyYAML: the one on PATH (may be pyenv/venv) or Debian's (python3-yaml).
python=
for p in "${PYTHON:-}" python3 /usr/bin/python3; do
  [ -n "$p" ] || continue
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import yaml' >/dev/null 2>&1; then python=$p; break; fi
done
[ -n "$python" ] || die "no python3 with PyYAML: apt-get install -y python3-yaml (or pip install pyyaml)"

[ -f "$RULE_CR" ] || die "$RULE_CR is missing"
compgen -G "$TESTS_DIR/*.yaml" >/dev/null || die "no rule unit tests in $TESTS_DIR/*.yaml"

work=$(mktemp -d "${TMPDIR:-/tmp}/oats-check-alerts.XXXXXX")
if [ "${1:-}" = "--keep" ]; then
  echo "check-alerts: work directory $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi

# Exactly one PrometheusRule in the file; write its .spec (a plain `groups:` rule file).
"$python" - "$RULE_CR" "$work/$RULES_NAME" <<'PY'
import sys, yaml
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"check-alerts: expected exactly one PrometheusRule in {src}, found {len(rules)}")
spec = rules[0].get("spec") or {}
if not spec.get("groups"):
    sys.exit(f"check-alerts: the PrometheusRule in {src} has no spec.groups")
with open(dst, "w") as f:
    yaml.safe_dump(spec, f, sort_keys=False, default_flow_style=False, width=1000)
PY

# The unit tests refer to the rule file by its bare name, relative to themselves.
cp "$TESTS_DIR"/*.yaml "$work/"
tests=()
for t in "$TESTS_DIR"/*.yaml; do tests+=("$(basename "$t")"); done

echo "check-alerts: $("$promtool" --version 2>&1 | head -n1)" >&2
"$promtool" check rules "$work/$RULES_NAME"
(cd "$work" && "$promtool" test rules "${tests[@]}")
echo "check-alerts: OK" >&2
