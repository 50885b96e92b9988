#!/usr/bin/env python3
"""Propagation through a real Kubernetes API server: etcd and kube-apiserver on loopback (the
binaries scripts/kube-build.sh caches), the CRDs, N Nodes, the real operator in cluster mode and
N real agents in observe mode (so the kernel is not the bottleneck), through the real broker.

Measures
  - `kubectl patch` of the Profile every host runs -> each agent's answer (from the operator's
    'agent applied' lines): p50 / p99 / max over all agents and rounds, and the last agent;
  - a Node created -> its Host exists (the operator's Node sync), and a Node created together
    with its agent -> the Host Active.

Usage (as root, after `cargo build --release --bins` and scripts/setup.sh):
  python3 bench/cluster_propagation.py [--agents 50] [--rounds 5] [--profile release]
"""
import json, os, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from propagation import Acks, bench_args, pct, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DOG_CACHE_DIR", os.path.expanduser("~/.cache/dog"))


def kube_version():
    with open(os.path.join(ROOT, "tests/kubernetes/go.mod")) as f:
        for line in f:
            w = line.split()
            if len(w) == 2 and w[0] == "k8s.io/kubernetes":
                return w[1]
    sys.exit("no k8s.io/kubernetes in tests/kubernetes/go.mod")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, work, procs):
        v = kube_version()
        self.kubectl_bin = os.path.join(CACHE, f"kubectl-{v}")
        apiserver = os.path.join(CACHE, f"kube-apiserver-{v}")
        for b in (self.kubectl_bin, apiserver):
            if not os.path.exists(b):
                sys.exit(f"{b} missing: run scripts/kube-build.sh")
        etcd_port, peer, port = free_port(), free_port(), free_port()
        os.makedirs(f"{work}/certs")
        with open(f"{work}/tokens.csv", "w") as f:
            f.write("bench-admin-token,bench-admin,bench-admin,system:masters\n")
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                        "-out", f"{work}/sa.key"], check=True)
        log = open(f"{work}/etcd.log", "w")
        procs.append(subprocess.Popen([
            "etcd", "--data-dir", f"{work}/etcd", "--name", "bench",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--log-level", "warn"],
            stdout=log, stderr=log))
        log = open(f"{work}/kube-apiserver.log", "w")
        procs.append(subprocess.Popen([
            apiserver, "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(port), "--cert-dir", f"{work}/certs",
            "--token-auth-file", f"{work}/tokens.csv", "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", f"{work}/sa.key",
            "--service-account-signing-key-file", f"{work}/sa.key",
            "--service-cluster-ip-range", "10.96.0.0/16", "--enable-priority-and-fairness=false"],
            stdout=log, stderr=log))
        self.kubeconfig = f"{work}/admin.kubeconfig"
        deadline = time.time() + 90
        while not os.path.exists(f"{work}/certs/apiserver.crt"):
            if time.time() > deadline:
                sys.exit("kube-apiserver wrote no certificate")
            time.sleep(0.2)
        with open(self.kubeconfig, "w") as f:
            f.write(f"apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n"
                    f"    server: https://127.0.0.1:{port}\n    certificate-authority: {work}/certs/apiserver.crt\n"
                    f"users:\n- name: a\n  user:\n    token: bench-admin-token\ncontexts:\n- name: b\n"
                    f"  context: {{cluster: b, user: a}}\ncurrent-context: b\n")
        while self.kubectl("get", "--raw", "/readyz", check=False).returncode != 0:
            if time.time() > deadline:
                sys.exit("kube-apiserver not ready")
            time.sleep(0.2)

    def kubectl(self, *args, stdin=None, check=True):
        return subprocess.run([self.kubectl_bin, *args], input=stdin, text=True, check=check,
                              capture_output=True, env={**os.environ, "KUBECONFIG": self.kubeconfig})


def node(name):
    return (f"apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{role: app}}}}\n")


def main():
    a, bindir = bench_args(50)
    prefix = f"dogkprop{os.getpid() % 10000}"
    ns = f"{prefix}-obs"
    work = tempfile.mkdtemp(prefix="dog-kprop-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs = []
    try:
        c = Cluster(work, procs)
        c.kubectl("apply", "-f", os.path.join(ROOT, "crds"))
        c.kubectl("wait", "--for=condition=Established", "-f", os.path.join(ROOT, "crds"))
        c.kubectl("create", "namespace", "dog-system")
        c.kubectl("apply", "-f", "-", stdin=(
            "apiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {name: app}\n"
            "spec: {profile: app, selector: {matchLabels: {role: app}}}\n---\n"
            "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {name: app}\nspec:\n  inbound:\n"
            "    - {name: app, action: ACCEPT, peer: {kind: Group, name: app}, protocol: tcp, ports: ['8000']}\n"))
        names = [f"{prefix}-{i:04d}" for i in range(a.agents)]
        c.kubectl("apply", "-f", "-", stdin="---\n".join(node(n) for n in names))
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run([os.path.join(bindir, "dog-operator"), "keygen", "--out", f"{work}/op.key",
                        "--public-out", f"{work}/op.pub"], check=True, stdout=subprocess.DEVNULL)
        oplog = open(f"{work}/operator.log", "w")
        procs.append(subprocess.Popen(
            [os.path.join(bindir, "dog-operator"), "run", "--signing-key", f"{work}/op.key",
             "--topology-prefix", prefix, "--keepalive-interval", "30", "--debounce", "0.05",
             "--metrics-addr", "127.0.0.1:0", "--log-format", "json",
             # the agents here have no ServiceAccount token and no pinned keys: admission is
             # not what this bench measures
             "--trust-on-first-use"],
            stdout=oplog, stderr=oplog,
            env={**os.environ, "KUBECONFIG": c.kubeconfig, "POD_NAME": f"{prefix}-op"}))

        def agent(name):
            return subprocess.Popen(
                [os.path.join(bindir, "dog-agent"), "--hostname", name, "--netns", ns,
                 "--mode", "observe", "--state-dir", f"{work}/state/{name}",
                 "--operator-public-keys", f"{work}/op.pub", "--topology-prefix", prefix,
                 "--keepalive-interval", "30", "--drift-interval", "3600",
                 "--address-interval", "3600", "--metrics-addr", "127.0.0.1:0", "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        for n in names:
            procs.append(agent(n))
        acks = Acks(f"{work}/operator.log")
        deadline = time.time() + 300
        while len(acks.after(0)) < a.agents:
            if time.time() > deadline:
                sys.exit(f"only {len(acks.after(0))} of {a.agents} agents answered")
            time.sleep(0.5)
        time.sleep(2)
        lat, last = [], []
        for r in range(a.rounds):
            t0 = time.time()
            c.kubectl("patch", "profile.dogfw.io", "app", "--type=json", "-p",
                      json.dumps([{"op": "replace", "path": "/spec/inbound/0/ports/0", "value": str(8001 + r)}]))
            deadline = time.time() + 60
            while True:
                got = acks.after(t0)
                if len(got) >= a.agents or time.time() > deadline:
                    break
                time.sleep(0.05)
            xs = [t - t0 for t in got.values()] + [float("inf")] * (a.agents - len(got))
            lat.extend(xs)
            last.append(max(xs))
            print(f"round {r}: {len(got)}/{a.agents} acked, last after {max(xs):.3f} s", flush=True)
            time.sleep(1)

        # Host writes while nothing changes: every agent keeps sending keepalives
        quiet = 60
        watch = subprocess.Popen([c.kubectl_bin, "get", "hosts.dogfw.io", "--watch-only", "-o", "name"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "KUBECONFIG": c.kubeconfig})
        time.sleep(quiet)
        watch.kill()
        writes = len([l for l in watch.communicate()[0].splitlines() if l.strip()])
        print(f"quiet {quiet} s: {writes} Host writes from {a.agents} agents", flush=True)

        # Node created -> Host exists; Node and agent started together -> Host Active
        exists, active = [], []
        for r in range(a.rounds):
            name = f"{prefix}-new{r}"
            t0 = time.time()
            c.kubectl("apply", "-f", "-", stdin=node(name))
            procs.append(agent(name))
            seen = None
            deadline = time.time() + 60
            while time.time() < deadline:
                out = c.kubectl("get", "hosts.dogfw.io", name, "--ignore-not-found", "-o",
                                "jsonpath={.metadata.name}/{.status.state}", check=False).stdout.strip()
                if seen is None and out.startswith(name):
                    seen = time.time() - t0
                if out.endswith("/Active"):
                    active.append(time.time() - t0)
                    break
                time.sleep(0.05)
            exists.append(seen if seen is not None else float("inf"))
            print(f"node {r}: Host after {exists[-1]:.3f} s, Active after {active[-1] if len(active) > r else float('inf'):.3f} s", flush=True)

        print()
        print(f"agents: {a.agents} (observe mode), rounds: {a.rounds}, profile: {a.profile}, kube-apiserver {kube_version()}")
        print(f"kubectl patch Profile -> agent ack: p50 {pct(lat, 50) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms, "
              f"last agent p50 {pct(last, 50) * 1000:.0f} ms, max {max(last) * 1000:.0f} ms")
        print(f"Host writes with {a.agents} quiet agents: {writes} in {quiet} s "
              f"({writes / a.agents / (quiet / 300):.2f} per host per 5 min; goal <= 1)")
        print(f"Node created -> Host exists: p50 {pct(exists, 50) * 1000:.0f} ms, max {max(exists) * 1000:.0f} ms")
        print(f"Node + agent started -> Host Active: p50 {pct(active or [float('inf')], 50) * 1000:.0f} ms, "
              f"max {max(active or [float('inf')]) * 1000:.0f} ms")
    finally:
        stop_all(procs, ns, prefix, work)


if __name__ == "__main__":
    main()
