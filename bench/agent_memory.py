#!/usr/bin/env python3
"""Agent resident memory: a real dog-agent (enforce mode, in its own network namespace) at rest
after applying a small firewall, and after applying one with a 1,000,000-entry set (a zone fed
by a ConfigMap), both sent by the real operator through the real broker. Kernel memory for the
set is not the agent's and is not counted (the agent's VmRSS/VmHWM are read from /proc).

Then the agent's CPU at rest with that set: keepalives every second, no drift check in the
window, CPU time of the agent and the tools it ran (utime + stime + cutime + cstime) over
REST_SECONDS.

Usage (as root, after `cargo build --release --bins`): python3 bench/agent_memory.py [BIN_DIR]
(BIN_DIR, default target/release, holds dog-agent and dog-operator: an older build measures
the same way.)
"""
import os, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from broker import delete_queues  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release")
REST_SECONDS = 20


def cpu_seconds(pid):
    """CPU time of the process and of its reaped children, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def fleet(d, host, big):
    write(os.path.join(d, "fleet.yaml"),
          f"apiVersion: dogfw.io/v1alpha1\nkind: Host\nmetadata: {{name: {host}, labels: {{role: app}}}}\nspec: {{}}\n---\n"
          "apiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {name: app}\n"
          "spec: {profile: app, selector: {matchLabels: {role: app}}}\n---\n"
          "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {name: app}\nspec:\n  inbound:\n"
          "    - {action: DROP, peer: {kind: Zone, name: blocklist}}\n"
          "    - {action: ACCEPT, protocol: tcp, ports: ['8080']}\n---\n"
          "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: blocklist}\n"
          "spec: {addresses: ['203.0.113.1'], configMapRefs: [{name: blocklist, namespace: default}]}\n")
    lines = "".join(f"    {16 + i // 65536}.{i // 256 % 256}.{i % 256}.1\n" for i in range(big))
    write(os.path.join(d, "blocklist.yaml"),
          "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: blocklist, namespace: default}\ndata:\n  addresses: |\n"
          + (lines or "    203.0.113.2\n"))


def applied(log, n):
    with open(log) as f:
        return f.read().count('"agent applied"') >= n


def main():
    pid = os.getpid() % 10000
    prefix, host = f"dogmem{pid}", f"dogmem{pid}-node"
    ns = host
    work = tempfile.mkdtemp(prefix="dog-agentmem-")
    d = os.path.join(work, "fleet")
    os.makedirs(d)
    procs = []
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run([f"{BIN}/dog-operator", "keygen", "--out", f"{work}/op.key", "--public-out", f"{work}/op.pub"],
                       check=True, stdout=subprocess.DEVNULL)
        fleet(d, host, 0)
        oplog = f"{work}/operator.log"
        procs.append(subprocess.Popen([f"{BIN}/dog-operator", "run", "--from-dir", d, "--signing-key", f"{work}/op.key",
                                       "--topology-prefix", prefix, "--metrics-addr", "127.0.0.1:0", "--log-format", "json",
                                       "--trust-on-first-use"],
                                      stdout=open(oplog, "w"), stderr=subprocess.STDOUT))
        agent = subprocess.Popen([f"{BIN}/dog-agent", "--hostname", host, "--netns", ns, "--state-dir", f"{work}/state",
                                  "--operator-public-keys", f"{work}/op.pub", "--topology-prefix", prefix,
                                  "--metrics-addr", "127.0.0.1:0", "--log-format", "json",
                                  "--keepalive-interval", "1", "--drift-interval", "3600"],
                                 stdout=open(f"{work}/agent.log", "w"), stderr=subprocess.STDOUT)
        procs.append(agent)
        deadline = time.time() + 60
        while not applied(oplog, 1):
            if time.time() > deadline:
                sys.exit(f"no apply; logs in {work}")
            time.sleep(0.2)
        time.sleep(3)
        rest = kb(agent.pid, "VmRSS")
        print(f"agent at rest (small firewall applied): VmRSS {rest / 1024:.1f} MiB")
        t = time.time()
        fleet(d, host, 1_000_000)
        while not applied(oplog, 2):
            if time.time() > deadline + 300:
                sys.exit(f"no second apply; logs in {work}")
            time.sleep(0.2)
        took = time.time() - t
        time.sleep(3)
        print(f"after the 1,000,000-entry set: applied {took:.1f} s after the file write; "
              f"VmRSS {kb(agent.pid, 'VmRSS') / 1024:.1f} MiB, peak VmHWM {kb(agent.pid, 'VmHWM') / 1024:.1f} MiB "
              f"(goal < 30 MB of its own)")
        before = cpu_seconds(agent.pid)
        time.sleep(REST_SECONDS)
        used = cpu_seconds(agent.pid) - before
        print(f"at rest with the 1,000,000-entry set, keepalive every 1 s: {used:.2f} CPU-s in "
              f"{REST_SECONDS} s ({used / REST_SECONDS * 1000:.0f} ms of CPU per keepalive)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        delete_queues(prefix)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
