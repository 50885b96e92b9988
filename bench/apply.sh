#!/usr/bin/env bash
# Agent apply cost vs the physical limit (raw iptables-restore / ipset restore on the same
# content, same run, same throwaway network namespace). Needs root.
#   bench/apply.sh            # full run (sets up to 1,000,000 entries)
#   DOG_BENCH_MAX_SET=100000 bench/apply.sh   # skip the 1M set
# Prints dog/raw ratios from criterion's estimates (mean point estimates).
set -euo pipefail
cd "$(dirname "$0")/.."
# where criterion writes its estimates, read back below (fixed so it never depends on cwd)
export CRITERION_HOME="$PWD/target/criterion"
cargo bench -p dog-agent --bench apply -- "$@"
python3 - <<'PY'
import json, os
root = "target/criterion"
rows = []
for group in ("rules", "sets", "delta"):
    gdir = os.path.join(root, group, "raw")
    if not os.path.isdir(gdir):
        continue
    for n in sorted(os.listdir(gdir), key=lambda s: int(s) if s.isdigit() else 0):
        def mean(who):
            p = os.path.join(root, group, who, n, "new", "estimates.json")
            with open(p) as f:
                return json.load(f)["mean"]["point_estimate"] / 1e6  # ns -> ms
        try:
            r = mean("raw")
        except FileNotFoundError:
            continue
        # dog: sets through netlink (the default); dog-cli: through the ipset tool
        for who in ("dog", "dog-cli"):
            try:
                rows.append((group, who, int(n), mean(who), r))
            except FileNotFoundError:
                pass
print(f"{'case':<8} {'way':<8} {'size':>9} {'dog ms':>10} {'raw ms':>10} {'ratio':>7}")
for g, who, n, d, r in rows:
    print(f"{g:<8} {who:<8} {n:>9} {d:>10.3f} {r:>10.3f} {d / r:>7.2f}")
PY
