#!/usr/bin/env bash
# The 5-minute tour, for real: RabbitMQ, dog-operator in --from-dir mode, and one dog-agent per
# fake node (web, db, bastion: network namespaces on a private bridge). Tells a short story with
# real connections, then cleans up after itself. Run as root from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib/fleet.sh

# unique per run, so two copies can run side by side (namespaces, broker names, logs)
PREFIX="dd$$"
work="$root/.demo/$PREFIX"
pids=()

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  fleet_down "$PREFIX"
  if command -v rabbitmqctl >/dev/null 2>&1; then
    for q in $(rabbitmqctl list_queues -q name 2>/dev/null | grep "^$PREFIX\." ); do
      rabbitmqctl delete_queue "$q" >/dev/null 2>&1
    done
  fi
}
trap cleanup EXIT

bash scripts/setup.sh --demo
say "building dog-operator and dog-agent"
cargo build --quiet --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

cleanup
rm -rf "$work"
mkdir -p "$work/state"
cp -r examples/demo "$work/fleet"

say "creating three nodes: web (198.18.0.1), db (198.18.0.2), bastion (198.18.0.3)"
fleet_up "$PREFIX" web db bastion

"$bin/dog-operator" keygen --out "$work/operator.key" --public-out "$work/operator.pub" >/dev/null
say "starting dog-operator --from-dir $work/fleet"
# The demo's agents are trusted on first use; a real VM fleet pins each agent's keys in its Host
# (`dog-agent --print-keys`, docs/operations.md "Admitting agents").
"$bin/dog-operator" run --from-dir "$work/fleet" --signing-key "$work/operator.key" \
  --trust-on-first-use \
  --topology-prefix "$PREFIX" --keepalive-interval 2 --resync-after 4 \
  --metrics-addr 127.0.0.1:0 --log-format json >"$work/operator.log" 2>&1 &
pids+=($!)

for node in web db bastion; do
  "$bin/dog-agent" --hostname "$node" --netns "$PREFIX-$node" --state-dir "$work/state/$node" \
    --operator-public-keys "$work/operator.pub" --topology-prefix "$PREFIX" \
    --keepalive-interval 2 --drift-interval 2 --address-interval 2 \
    --metrics-addr 127.0.0.1:0 --log-format json >"$work/agent-$node.log" 2>&1 &
  pids+=($!)
done

status="$work/fleet/.dog-status.yaml"
# host_field HOST FIELD: a scalar field of a host's status in the status file
host_field() {
  awk -v h="  $1:" -v f="$2:" '
    /^hosts:/ {inh=1; next} /^[a-z]/ {inh=0}
    inh && $0==h {inhost=1; next}
    inh && /^  [^ ]/ {inhost=0}
    inhost && $1==f {print $2; exit}' "$status"
}
in_sync() { [ -f "$status" ] && [ "$(grep -c 'reason: HashesMatch' "$status")" -ge 3 ]; }
wait_for() { # seconds, description, command...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do "$@" && return 0; sleep 0.2; done
  echo "timed out waiting for $what; logs are in $work" >&2
  exit 1
}
try_tcp() { # from-node to-address port
  ip netns exec "$PREFIX-$1" socat -T1 /dev/null "TCP:$2:$3,connect-timeout=1" >/dev/null 2>&1
}
serve_tcp() { # node port; returns once the socket listens
  ip netns exec "$PREFIX-$1" socat "TCP-LISTEN:$2,fork,reuseaddr" EXEC:/bin/true >/dev/null 2>&1 &
  pids+=($!)
  listening() { [ -n "$(ip netns exec "$PREFIX-$1" ss -Hlnt "sport = :$2")" ]; }
  wait_for 20 "a listener on $1:$2" listening "$1" "$2"
}

say "waiting until every agent has applied its rules and reported matching hashes"
wait_for 60 "hosts in sync" in_sync
for h in web db bastion; do
  printf '   %-8s %-7s revision %s  InSync\n' "$h" "$(host_field $h state)" "$(host_field $h appliedRevision)"
done

serve_tcp db 5432
say "1. web -> db:5432 (the db profile accepts 5432 from group web)"
if try_tcp web 198.18.0.2 5432; then echo "   connected"; else echo "   UNEXPECTED: refused" >&2; exit 1; fi

say "2. editing the db profile: 5432 now only from group bastion"
sed -i '/name: pg-web/d' "$work/fleet/profiles.yaml"
before=$(host_field db appliedRevision)
changed() { [ "$(host_field db appliedRevision)" != "$before" ] && in_sync; }
wait_for 30 "the change to reach db" changed
echo "   the operator recompiled and published; db applied revision $(host_field db appliedRevision) (was $before)"

say "3. web -> db:5432 again"
if try_tcp web 198.18.0.2 5432; then echo "   UNEXPECTED: still connects" >&2; exit 1; else echo "   refused (dropped by dog on db)"; fi
if try_tcp bastion 198.18.0.2 5432; then echo "   bastion -> db:5432 still connects"; fi

say "4. someone flushes dog's chain on db by hand"
ip netns exec "$PREFIX-db" iptables -F DOG-INPUT
if try_tcp web 198.18.0.2 5432; then echo "   web -> db:5432 connects now: a hole"; fi
repaired() { ! try_tcp web 198.18.0.2 5432; }
wait_for 20 "the drift repair" repaired
echo "   within the drift interval the agent noticed and repaired it:"
line=$(grep -h '"drift repaired"' "$work/agent-db.log" | tail -1 | sed -E 's/.*"timestamp":"([^"]+)".*"parts":"([^"]+)".*/   \1 drift repaired: \2/')
echo "$line"
case "$line" in *"drift repaired: ipv4_rules"*) ;; *) echo "   UNEXPECTED drift log line: $line" >&2; exit 1 ;; esac
if try_tcp web 198.18.0.2 5432; then echo "   UNEXPECTED: hole still open" >&2; exit 1; else echo "   web -> db:5432 refused again"; fi

say "5. why? dog-operator explain names the rule that decides and what it matched"
"$bin/dog-operator" explain --from-dir "$work/fleet" --host db --peer 198.18.0.1 --protocol tcp --port 5432 | sed 's/^/   /'
"$bin/dog-operator" explain --from-dir "$work/fleet" --host db --peer 198.18.0.3 --protocol tcp --port 5432 | sed 's/^/   /' | head -3

say "done: logs and status were in $work; cleaning up"
