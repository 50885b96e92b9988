#!/usr/bin/env python3
"""Propagation at fleet scale: the real operator (--from-dir) and N simulated agents in one
process (dog-fleet-sim: real keys, envelopes and queues on the real broker, no kernel), all on
this machine. The hosts' keys are pinned by their Host objects (as an administrator pins VMs),
so admission is not what is measured.

Measures the time from a Profile change (the file write) to the operator receiving each
host's response, over several rounds, and prints p50 / p99 / max, the operator's peak RSS and
the broker's memory.

Usage (as root, after `cargo build --release --bins`):
  python3 bench/fleet_propagation.py [--agents 5000] [--rounds 3] [--profile release]
"""
import os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from propagation import Acks, bench_args, group_and_profile, pct, rss_kb, stop_all, write  # noqa: E402


def rules(d, port):
    group_and_profile(d, port)
    write(os.path.join(d, "zones.yaml"),
          "apiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {name: office}\n"
          "spec: {addresses: ['203.0.113.1']}\n")


def broker_memory_mib():
    """The broker node's total memory as the Erlang VM counts it."""
    out = subprocess.run(["rabbitmqctl", "eval", "erlang:memory(total)."],
                         capture_output=True, text=True).stdout.strip()
    try:
        return int(out) / (1 << 20)
    except ValueError:
        return float("nan")


def main():
    a, bindir = bench_args(5000)
    prefix = f"dogsim{os.getpid() % 10000}"
    work = tempfile.mkdtemp(prefix="dog-sim-")
    d = os.path.join(work, "fleet")
    os.makedirs(d)
    procs = []
    try:
        subprocess.run([os.path.join(bindir, "dog-operator"), "keygen", "--out", f"{work}/op.key",
                        "--public-out", f"{work}/op.pub"], check=True, stdout=subprocess.DEVNULL)
        rules(d, 8000)
        broker_before = broker_memory_mib()
        simlog = open(f"{work}/sim.log", "w")
        sim = subprocess.Popen([os.path.join(bindir, "dog-fleet-sim"), "--hosts", str(a.agents),
                                "--name-prefix", prefix, "--hosts-file", f"{d}/hosts.yaml",
                                "--operator-public-keys", f"{work}/op.pub",
                                "--topology-prefix", prefix, "--classic-queues"],
                               stdout=simlog, stderr=simlog)
        procs.append(sim)
        deadline = time.time() + 120
        while not os.path.exists(f"{d}/hosts.yaml"):
            if time.time() > deadline or sim.poll() is not None:
                sys.exit("the simulator wrote no hosts file (see sim.log)")
            time.sleep(0.2)
        oplog = open(f"{work}/operator.log", "w")
        op = subprocess.Popen([os.path.join(bindir, "dog-operator"), "run", "--from-dir", d,
                               "--signing-key", f"{work}/op.key", "--topology-prefix", prefix,
                               "--classic-queues", "--keepalive-interval", "600",
                               "--debounce", "0.05", "--metrics-addr", "127.0.0.1:0",
                               "--log-format", "json"],
                              stdout=oplog, stderr=oplog)
        procs.append(op)
        acks = Acks(f"{work}/operator.log")
        deadline = time.time() + 600
        t_start = time.time()
        while len(acks.after(0)) < a.agents:
            if time.time() > deadline:
                sys.exit(f"only {len(acks.after(0))} of {a.agents} hosts answered (see {work})")
            time.sleep(0.5)
        print(f"all {a.agents} hosts admitted and answered their first Apply after "
              f"{time.time() - t_start:.1f} s", flush=True)
        time.sleep(2)
        lat_all = []
        for r in range(a.rounds):
            t0 = time.time()
            rules(d, 8001 + r)  # a port changes: every host's rules are rendered anew
            deadline = time.time() + 120
            while True:
                got = acks.after(t0)
                if len(got) >= a.agents or time.time() > deadline:
                    break
                time.sleep(0.05)
            lat = [t - t0 for t in got.values()]
            lat_all.extend(lat + [float("inf")] * (a.agents - len(lat)))
            print(f"round {r}: {len(lat)}/{a.agents} acked, p50 {pct(lat, 50):.3f} s, "
                  f"last after {max(lat) if lat else float('nan'):.3f} s", flush=True)
            time.sleep(2)
        peak = rss_kb(op.pid, "VmHWM")
        broker_after = broker_memory_mib()
        print()
        print(f"simulated hosts: {a.agents}, rounds: {a.rounds}, profile: {a.profile}")
        print(f"profile change -> host ack: p50 {pct(lat_all, 50) * 1000:.0f} ms, "
              f"p99 {pct(lat_all, 99) * 1000:.0f} ms, max {max(lat_all) * 1000:.0f} ms  (goal: p99 < 2000 ms)")
        print(f"operator peak RSS: {peak / 1024:.1f} MiB; broker memory {broker_before:.0f} -> "
              f"{broker_after:.0f} MiB with {a.agents} host queues")
    finally:
        stop_all(procs, f"{prefix}-none", prefix, work)


if __name__ == "__main__":
    main()
