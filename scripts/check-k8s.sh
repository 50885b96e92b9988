#!/usr/bin/env bash
# Validates everything dog ships for Kubernetes:
#   - crds/ and charts/dog/crds/ (identical; generated from operator/src/crd.rs); what their
#     schemas and CEL rules refuse is tested against a real API server
#     (tests/e2e/tests/apiserver.rs, on tests/fixtures/admission/)
#   - the Helm chart: `helm lint --strict`, values.schema.json refusing bad values, rendering
#     with default values and with every option on (Helm's own Go SDK via helm-python-sdk)
#   - every rendered object and crds/ against the Kubernetes OpenAPI schemas of 1.25 (the oldest it ships) and of
#     the newest version kubernetes-validate knows (strict: unknown fields are errors)
#   - the security properties the spec promises (agent caps, non-root operator, RBAC)
#   - manifests/dog.yaml is exactly the chart rendered with default values
#   - the alerts pass `promtool check rules` and their unit tests (tests/alerts/dog.test.yaml),
#     and each has a runbook_url whose anchor is a heading of docs/operations.md
#
# Needs python3 (with venv) and PyPI; installs its tools into a venv under target/. promtool
# comes from scripts/prom-build.sh (Go; cached outside the repository).
# Idempotent. Exits non-zero on any problem.
#   scripts/check-k8s.sh            check
#   scripts/check-k8s.sh --update   rewrite manifests/dog.yaml from the chart, then check
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${DOG_K8S_VENV:-$ROOT/target/k8s-venv}"
REQ="$ROOT/scripts/requirements-k8s.txt"
# Oldest and newest schema sets kubernetes-validate ships (it has none older than 1.25).
K8S_VERSIONS=(1.25.0 1.37.0)

say() { printf '== %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
# Reinstall only when the requirements changed.
STAMP="$VENV/.requirements.sha256"
if ! sha256sum --status -c "$STAMP" 2>/dev/null; then
  say "installing $(grep -cvE '^\s*(#|$)' "$REQ") Python tools from PyPI"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
  sha256sum "$REQ" > "$STAMP"
fi
PY="$VENV/bin/python"
TOOL="$ROOT/scripts/chart_tool.py"

if [[ "${1:-}" == "--update" ]]; then
  "$PY" "$TOOL" update-manifests
fi

say "chart crds/ equals crds/"
diff -r "$ROOT/crds" "$ROOT/charts/dog/crds"

say "helm lint --strict"
"$PY" "$TOOL" lint

say "values.schema.json"
"$PY" "$TOOL" check-schema

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
say "render: defaults and every option on"
"$PY" "$TOOL" render --out "$OUT/defaults.yaml"
"$PY" "$TOOL" render --values "$ROOT/scripts/k8s-values-all.yaml" --out "$OUT/all.yaml"

say "security and shape policy"
"$PY" "$TOOL" check-policy "$OUT/defaults.yaml" "$OUT/all.yaml" "$ROOT/manifests/dog.yaml"

for v in "${K8S_VERSIONS[@]}"; do
  say "kubernetes-validate --strict against Kubernetes $v"
  # ServiceMonitor/PrometheusRule are Prometheus Operator CRDs without published schemas
  # here; kubernetes-validate reports them as unknown kinds and they are skipped below.
  log="$OUT/validate-$v.log"
  if ! "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" \
      "$ROOT"/crds/*.yaml "$ROOT/manifests/dog.yaml" "$OUT/defaults.yaml" "$OUT/all.yaml" >"$log" 2>&1; then
    if grep -vE 'monitoring\.coreos\.com|servicemonitor|prometheusrule|^\s*$' "$log" | grep -qiE 'error|fail'; then
      cat "$log" >&2
      echo "FAIL: Kubernetes $v schema validation" >&2
      exit 1
    fi
  fi
  grep -iE 'error|fail|warn' "$log" | sed 's/^/  /' || true
done

say "alerts: promtool check rules and promtool test rules (tests/alerts/dog.test.yaml)"
PROMTOOL="$(bash "$ROOT/scripts/prom-build.sh")"
"$PY" "$TOOL" check-alerts --promtool "$PROMTOOL"

say "manifests/dog.yaml is up to date"
"$PY" "$TOOL" check-manifests

say "all Kubernetes checks passed"
