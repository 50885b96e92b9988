#!/usr/bin/env bash
# Builds promtool, the Prometheus release pinned in tests/prometheus/go.mod, into a cache
# outside the repository (${DOG_CACHE_DIR:-~/.cache/dog}/promtool-<version>). The suite runs it
# on the agent's and the operator's live /metrics output (tests/e2e/tests/fleet.rs, live_metrics_pass_promtool)
# and on the chart's alerting rules (scripts/check-alerts.sh). A binary already there is kept:
# the first build takes about five minutes, later runs nothing.
#   scripts/prom-build.sh          build what is missing, print the binary's path
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/prometheus"
CACHE="${DOG_CACHE_DIR:-$HOME/.cache/dog}"
VERSION="$(awk '$1 == "github.com/prometheus/prometheus" {print $2}' "$MOD/go.mod")"
[[ -n "$VERSION" ]] || { echo "no github.com/prometheus/prometheus version in $MOD/go.mod" >&2; exit 1; }
[[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "go not found: the test suite builds promtool with Go" >&2; exit 1; }
out="$CACHE/promtool-$VERSION"
mkdir -p "$CACHE"
if [[ ! -x "$out" ]]; then
  printf '[prom-build] building promtool %s (first time only; a few minutes)\n' "$VERSION" >&2
  (cd "$MOD" && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$out.tmp" github.com/prometheus/prometheus/cmd/promtool)
  mv "$out.tmp" "$out"
fi
echo "$out"
