#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build, test and demo dog, and makes sure
# RabbitMQ is running on 127.0.0.1:5672. Idempotent; safe to run on every test run.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and the tests create network namespaces)" >&2
  exit 1
fi

need=()
for pair in iptables:iptables ipset:ipset ip:iproute2 rabbitmq-server:rabbitmq-server \
            rabbitmqctl:rabbitmq-server socat:socat nc:netcat-openbsd conntrack:conntrack \
            python3:python3 curl:curl ping:iputils-ping etcd:etcd-server openssl:openssl; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# both iptables backends are used by the tests
command -v iptables-legacy >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  log "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain >= 1.89 (rustup) and re-run" >&2
  exit 1
fi

# The real Kubernetes API server and kubectl the suite runs (built once from the pinned Go module,
# cached outside the repository). The tests start etcd and kube-apiserver themselves.
# `setup.sh --demo` skips them: the demo needs only the kernel tools and the broker.
if [ "${1:-}" != "--demo" ]; then
  [[ -x /usr/local/go/bin/go ]] && PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null 2>&1 || { echo "go not found: install Go >= 1.24 and re-run" >&2; exit 1; }
  bash "$(dirname "${BASH_SOURCE[0]}")/kube-build.sh" >/dev/null
  # promtool, which checks the live /metrics output and the chart's alerts (same cache).
  bash "$(dirname "${BASH_SOURCE[0]}")/prom-build.sh" >/dev/null
fi

# RabbitMQ: start it if nothing answers on 5672, with the management API on 15672 (the
# operator provisions each node's own broker user through it).
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
management_up() { (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; }
if ! broker_up; then
  rabbitmq-plugins --offline enable rabbitmq_management >/dev/null
  log "starting rabbitmq-server"
  if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
    systemctl start rabbitmq-server || rabbitmq-server -detached
  else
    # With the descriptor limit the package's systemd unit gives it (LimitNOFILE=65536, or the
    # hard limit if lower): the wrapper's `su` would leave the broker at the login default of
    # 1024, and with thousands of host queues its file handle cache then closes and reopens
    # queue index files all the time (a quarter of the broker's reductions in the 5,000-host
    # bench).
    (cd /var/lib/rabbitmq && su rabbitmq -s /bin/sh -c \
      'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached') \
      || rabbitmq-server -detached || true
  fi
  for _ in $(seq 1 90); do
    broker_up && break
    sleep 1
  done
  broker_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
fi
# wait until the node is fully booted (the port opens a little before queues can be declared)
rabbitmqctl await_startup >/dev/null 2>&1 || true
if ! management_up; then
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 1 60); do
    management_up && break
    sleep 1
  done
  management_up || { echo "the RabbitMQ management API did not come up on 127.0.0.1:15672" >&2; exit 1; }
fi
ready="$(iptables --version), ipset $(ipset --version | awk '{print $2}' | tr -d ,), RabbitMQ on 127.0.0.1:5672 (management on 15672)"
if [ "${1:-}" != "--demo" ]; then
  ready="$ready, etcd $(etcd --version | awk 'NR==1 {print $3}'), kube-apiserver $(awk '$1 == "k8s.io/kubernetes" {print $2}' "$(dirname "${BASH_SOURCE[0]}")/../tests/kubernetes/go.mod")"
fi
log "ready: $ready"
