#!/usr/bin/env python3
"""Operator memory at fleet scale: the real dog-operator (--from-dir) on 5,000 hosts (IPv4 +
IPv6 addresses reported), 500 groups, 500 profiles of 20 rules and zones holding 1,000,000
addresses (a 500,000-entry blocklist in a ConfigMap used by every profile, plus 999 zones of
500). No agents: this measures the operator's own resident memory after it has loaded,
compiled and written status for everything, next to the size of the input files.

Usage: python3 bench/operator_memory.py [--profile release]
"""
import argparse, os, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from broker import delete_queues  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(d):
    with open(os.path.join(d, "hosts.yaml"), "w") as f:
        for i in range(5000):
            f.write(f"---\napiVersion: dogfw.io/v1alpha1\nkind: Host\nmetadata: {{name: h{i:05d}, labels: {{g: g{i % 500}}}}}\n"
                    f"spec: {{}}\nstatus:\n  state: Active\n  interfaces:\n  - name: eth0\n"
                    f"    addresses: ['10.{i // 250 % 250}.{i % 250}.1', 'fd00::{i:x}']\n")
    with open(os.path.join(d, "groups.yaml"), "w") as f:
        for g in range(500):
            f.write(f"---\napiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {{name: g{g}}}\n"
                    f"spec: {{profile: p{g}, selector: {{matchLabels: {{g: g{g}}}}}}}\n")
    with open(os.path.join(d, "profiles.yaml"), "w") as f:
        for p in range(500):
            f.write(f"---\napiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {{name: p{p}}}\nspec:\n  inbound:\n")
            f.write("  - {action: DROP, peer: {kind: Zone, name: blocklist}}\n")
            for r in range(19):
                peer = ["{kind: Group, name: g%d}" % ((p + r) % 500), "{kind: Zone, name: z%d}" % ((p * 7 + r) % 999),
                        "{kind: Self}", "{kind: Any}"][r % 4]
                f.write(f"  - {{action: ACCEPT, peer: {peer}, protocol: tcp, ports: ['{1000 + r}', '{2000 + r}-{2100 + r}']}}\n")
    with open(os.path.join(d, "zones.yaml"), "w") as f:
        f.write("apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: blocklist}\n"
                "spec: {addresses: [], configMapRefs: [{name: blocklist, namespace: dog-system}]}\n")
        for z in range(999):
            addrs = ", ".join(f"'100.{z // 250}.{z % 250}.{a % 250}/32'" if a % 2 else f"'2001:db8:{z:x}::{a:x}'"
                              for a in range(500))
            f.write(f"---\napiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {{name: z{z}}}\nspec: {{addresses: [{addrs}]}}\n")
    with open(os.path.join(d, "blocklist.yaml"), "w") as f:
        f.write("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: blocklist, namespace: dog-system}\ndata:\n  addresses: |\n")
        for i in range(500000):
            f.write(f"    {44 + i // 65536 % 100}.{i // 256 % 256}.{i % 256}.0/24\n" if i % 5 else f"    2001:db8:ff{i % 16:x}:{i // 16 % 65536:x}::/64\n")


def kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="release")
    a = ap.parse_args()
    bindir = os.path.join(ROOT, "target", a.profile)
    work = tempfile.mkdtemp(prefix="dog-mem-")
    d = os.path.join(work, "fleet")
    os.makedirs(d)
    op = None
    try:
        t = time.time()
        gen(d)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"generated {size / 1e6:.0f} MB of YAML in {time.time() - t:.1f} s")
        subprocess.run([os.path.join(bindir, "dog-operator"), "keygen", "--out", f"{work}/op.key"],
                       check=True, stdout=subprocess.DEVNULL)
        log = open(f"{work}/operator.log", "w")
        t0 = time.time()
        op = subprocess.Popen([os.path.join(bindir, "dog-operator"), "run", "--from-dir", d,
                               "--signing-key", f"{work}/op.key", "--topology-prefix", f"dogmem{os.getpid()}",
                               "--metrics-addr", "127.0.0.1:0", "--log-format", "json"], stdout=log, stderr=log)
        status = os.path.join(d, ".dog-status.yaml")
        while not (os.path.exists(status) and os.path.getsize(status) > 1_000_000):
            if op.poll() is not None or time.time() - t0 > 600:
                sys.exit("operator did not write its status; see " + f"{work}/operator.log")
            time.sleep(0.5)
        ready = time.time() - t0
        time.sleep(3)
        print(f"operator: loaded, compiled and wrote status in {ready:.1f} s")
        print(f"operator resident memory: now {kb(op.pid, 'VmRSS') / 1024:.0f} MiB, peak {kb(op.pid, 'VmHWM') / 1024:.0f} MiB "
              f"(goal < 300 MB) for 5,000 hosts, 1,000,000 zone entries")
    finally:
        if op:
            op.send_signal(signal.SIGKILL)
            op.wait()
        delete_queues(f"dogmem{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
