#!/usr/bin/env python3
"""Propagation benchmark: the real operator (--from-dir) and N real agent processes in observe
mode (so the kernel is not the bottleneck), through the real broker on 127.0.0.1:5672.

Measures, per agent, the time from a resource change (the file write) to the operator
receiving that agent's response, for two kinds of change:
  - rules: a profile every host runs changes -> one encrypted Apply per host
  - set:   a zone every host uses changes    -> one shared-set publish for all hosts
and prints p50 / p99 / max over all agents and rounds, plus the operator's peak RSS.

With --zone-size N the zone holds N addresses and each set round replaces one of them, so the
set change measures a one-entry delta of a large set; the bench then also prints the bytes of
the sealed change (the operator logs each publish's size) against the whole set's.

Usage (as root, after `cargo build --release --bins`):
  python3 bench/propagation.py [--agents 200] [--rounds 5] [--profile release] [--zone-size N]
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from broker import delete_queues  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def zone_yaml(size, r):
    """The office zone: with size 0 a few addresses that differ per round r; otherwise `size`
    addresses of which only the last differs per round."""
    if size == 0:
        addrs = ", ".join(f"'203.0.113.{i}'" for i in range(1, 2 + r))
    else:
        addrs = ", ".join(f"'10.{i >> 16}.{(i >> 8) & 255}.{i & 255}'" for i in range(size - 1))
        addrs += f", '198.51.100.{r + 1}'"
    return f"apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {{name: office}}\nspec: {{addresses: [{addrs}]}}\n"


def group_and_profile(d, port):
    """The one Group every host is in and its Profile: `port` from the Group, 22 from the
    office zone."""
    write(os.path.join(d, "groups.yaml"),
          "apiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {name: app}\n"
          "spec: {profile: app, selector: {matchLabels: {role: app}}}\n")
    write(os.path.join(d, "profiles.yaml"),
          "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {name: app}\nspec:\n  inbound:\n"
          f"    - {{name: app, action: ACCEPT, peer: {{kind: Group, name: app}}, protocol: tcp, ports: ['{port}']}}\n"
          "    - {name: office, action: ACCEPT, peer: {kind: Zone, name: office}, protocol: tcp, ports: ['22']}\n")


def fleet(d, n, prefix, port, zone_extra, zone_size=0):
    hosts = []
    for i in range(n):
        hosts.append(
            f"apiVersion: dogfw.io/v1alpha1\nkind: Host\nmetadata: {{name: {prefix}-{i:04d}, labels: {{role: app}}}}\n"
            f"spec: {{addresses: ['198.18.{i // 250}.{i % 250 + 1}']}}\n")
    write(os.path.join(d, "hosts.yaml"), "---\n".join(hosts))
    group_and_profile(d, port)
    if zone_size == 0 or not os.path.exists(os.path.join(d, "zones.yaml")):
        write(os.path.join(d, "zones.yaml"), zone_yaml(zone_size, zone_extra))


class Acks:
    """The operator's 'agent applied' lines (JSON log), read incrementally: the bench polls
    every 50 ms and must not spend the CPU it is measuring on re-reading the whole log."""

    def __init__(self, log):
        self.log, self.offset, self.seen = log, 0, []
        # passes started and ended, Applies published and answered (by request id)
        self.started, self.ended, self.published, self.answered = 0, 0, set(), set()

    def read(self):
        with open(self.log) as f:
            f.seek(self.offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # a partial line: read it whole next time
                self.offset += len(line.encode())
                kind = next((k for k in ('"agent applied"', '"published desired state"',
                                         '"sending a pass of publishes"',
                                         '"pass of publishes ended"') if k in line), None)
                if kind is None:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if kind == '"agent applied"':
                    self.seen.append((ts(e["timestamp"]), e["host"]))
                    self.answered.add(e.get("request"))
                elif kind == '"published desired state"':
                    self.published.add(e.get("request"))
                elif kind == '"sending a pass of publishes"':
                    self.started += 1
                else:
                    self.ended += 1

    def settled(self):
        """No pass under way and every Apply published so far answered: the next change's
        answers cannot be mistaken for an earlier pass's."""
        self.read()
        return self.started == self.ended and self.published <= self.answered

    def after(self, t0):
        """host -> first 'agent applied' timestamp at or after t0."""
        self.read()
        out = {}
        for t, host in self.seen:
            if t >= t0 and host not in out:
                out[host] = t
        return out


def stop_all(procs, ns, prefix, work, keep=False):
    """Kills the bench's processes and removes its namespace, broker queues and files
    (`keep` or DOG_BENCH_KEEP=1 keeps the files)."""
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
    delete_queues(prefix)
    if keep or os.environ.get("DOG_BENCH_KEEP"):
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def published_sizes(log):
    """The sealed size of each shared-set publish in the operator's JSON log, by kind."""
    out = {}
    with open(log) as f:
        for line in f:
            if '"published shared set' not in line:
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            out.setdefault(e["message"], []).append(int(e["bytes"]))
    return out


def rss_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_args(agents, more=None):
    """The flags the propagation benches take (`more` adds a bench's own), and the directory
    of the binaries."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=agents)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", default="release")
    if more:
        more(ap)
    a = ap.parse_args()
    return a, os.path.join(ROOT, "target", a.profile)


def main():
    a, bindir = bench_args(200, lambda ap: ap.add_argument(
        "--zone-size", type=int, default=0, help="addresses in the zone every host uses"))
    prefix = f"dogprop{os.getpid() % 10000}"
    ns = f"{prefix}-obs"
    work = tempfile.mkdtemp(prefix="dog-prop-")
    d = os.path.join(work, "fleet")
    os.makedirs(d)
    procs = []
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run([os.path.join(bindir, "dog-operator"), "keygen", "--out", f"{work}/op.key",
                        "--public-out", f"{work}/op.pub"], check=True, stdout=subprocess.DEVNULL)
        fleet(d, a.agents, prefix, 8000, 0, a.zone_size)
        oplog = open(f"{work}/operator.log", "w")
        op = subprocess.Popen([os.path.join(bindir, "dog-operator"), "run", "--from-dir", d,
                               "--signing-key", f"{work}/op.key", "--topology-prefix", prefix,
                               "--keepalive-interval", "30", "--debounce", "0.05",
                               "--metrics-addr", "127.0.0.1:0", "--log-format", "json",
                               # the simulated fleet registers all at once
                               "--trust-on-first-use", "--registration-burst", "100000",
                               "--registrations-per-minute", "100000"],
                              stdout=oplog, stderr=oplog)
        procs.append(op)
        # DOG_BENCH_KEEP=1 also keeps every agent's log (agent-NNNN.log) for a timeline
        keep = bool(os.environ.get("DOG_BENCH_KEEP"))
        for i in range(a.agents):
            alog = open(f"{work}/agent-{i:04d}.log", "w") if keep else subprocess.DEVNULL
            p = subprocess.Popen([os.path.join(bindir, "dog-agent"), "--hostname", f"{prefix}-{i:04d}",
                                  "--netns", ns, "--mode", "observe", "--state-dir", f"{work}/state/{i}",
                                  "--operator-public-keys", f"{work}/op.pub", "--topology-prefix", prefix,
                                  "--keepalive-interval", "30", "--drift-interval", "3600",
                                  "--address-interval", "3600", "--metrics-addr", "127.0.0.1:0",
                                  "--log-format", "json"],
                                 stdout=alog, stderr=alog)
            procs.append(p)
        # every agent registered and answered its first Apply
        deadline = time.time() + 300
        acks = Acks(f"{work}/operator.log")
        while len(acks.after(0)) < a.agents:
            if time.time() > deadline:
                sys.exit(f"only {len(acks.after(0))} of {a.agents} agents answered")
            time.sleep(0.5)
        time.sleep(2)
        results = {"rules": [], "set": []}
        for r in range(a.rounds):
            for kind in ("rules", "set"):
                t0 = time.time()
                if kind == "rules":
                    # port changes: rules re-rendered
                    fleet(d, a.agents, prefix, 8001 + r, r, a.zone_size)
                elif a.zone_size == 0:
                    write(os.path.join(d, "zones.yaml"),
                          "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: office}\n"
                          f"spec: {{addresses: ['203.0.113.0/28', '198.51.100.{r + 1}']}}\n")
                else:
                    write(os.path.join(d, "zones.yaml"), zone_yaml(a.zone_size, r + 1))
                deadline = time.time() + 60
                while True:
                    got = acks.after(t0)
                    if len(got) >= a.agents or time.time() > deadline:
                        break
                    time.sleep(0.05)
                lat = [t - t0 for t in got.values()]
                missing = a.agents - len(lat)
                results[kind].extend(lat + [float("inf")] * missing)
                print(f"round {r} {kind:5}: {len(lat)}/{a.agents} acked, last after {max(lat) if lat else float('nan'):.3f} s",
                      flush=True)
                time.sleep(1)
        peak = rss_kb(op.pid, "VmHWM")
        print()
        print(f"agents: {a.agents} (observe mode), rounds: {a.rounds}, profile: {a.profile}")
        for kind, xs in results.items():
            print(f"{kind:5} change -> agent ack: p50 {pct(xs, 50) * 1000:.0f} ms, p99 {pct(xs, 99) * 1000:.0f} ms, "
                  f"max {max(xs) * 1000:.0f} ms  (goal: p99 < 1000 ms)")
        print(f"operator peak RSS: {peak / 1024:.1f} MiB")
        sizes = published_sizes(f"{work}/operator.log")
        for what, xs in sizes.items():
            print(f"{what}: {len(xs)} publishes, bytes each (the broker copies it into every "
                  f"recipient's queue): min {min(xs)}, max {max(xs)}")
    finally:
        stop_all(procs, ns, prefix, work)


if __name__ == "__main__":
    main()
