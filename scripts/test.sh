#!/usr/bin/env bash
# The whole test suite: setup, formatting and lint gates, every Rust test (unit, kernel tests in
# network namespaces, real-broker tests, end-to-end), and the Kubernetes manifest checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# the end-to-end tests run the real binaries
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
bash scripts/check-k8s.sh
# the README's first command, end to end
bash scripts/demo.sh
# one closing line for the whole suite
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f; exit (f > 0)}' "$log"
