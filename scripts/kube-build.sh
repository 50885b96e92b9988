#!/usr/bin/env bash
# Builds the real Kubernetes API server and kubectl that the test suite runs, from the
# k8s.io/kubernetes Go module pinned in tests/kubernetes/go.mod, into a cache outside the
# repository (${DOG_CACHE_DIR:-~/.cache/dog}/<name>-<version>). A binary already there is kept:
# the first build takes several minutes, later runs nothing.
#   scripts/kube-build.sh          build what is missing, print the cache directory
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/kubernetes"
CACHE="${DOG_CACHE_DIR:-$HOME/.cache/dog}"
VERSION="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$MOD/go.mod")"
[[ -n "$VERSION" ]] || { echo "no k8s.io/kubernetes version in $MOD/go.mod" >&2; exit 1; }
[[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "go not found: the test suite builds kube-apiserver with Go" >&2; exit 1; }
MINOR="$(echo "$VERSION" | cut -d. -f2)"
# the version the binaries report (`kubectl version`, the server's /version)
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR -X $pkg.gitTreeState=clean"
done
mkdir -p "$CACHE"
for name in kube-apiserver kubectl; do
  out="$CACHE/$name-$VERSION"
  [[ -x "$out" ]] && continue
  printf '[kube-build] building %s %s (first time only; a few minutes)\n' "$name" "$VERSION" >&2
  (cd "$MOD" && go build -mod=readonly -trimpath -ldflags "$LDFLAGS" -o "$out.tmp" "./$name")
  mv "$out.tmp" "$out"
done
echo "$CACHE"
