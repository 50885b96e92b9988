#!/usr/bin/env python3
"""Propagation at fleet scale: the real operator (--from-dir) and N simulated agents in one
process (dog-fleet-sim: real keys, envelopes and queues on the real broker, no kernel), all on
this machine. The hosts' keys are pinned by their Host objects (as an administrator pins VMs),
so admission is not what is measured.

Measures the time from a Profile change (the file write) to the operator receiving each
host's response, over several rounds, and prints p50 / p99 / max, the CPU the broker, the
operator and the simulator spend per round, the operator's peak RSS and the broker's memory.
Then, with dog stopped, it measures the broker's floor for the same number of queues in the
same run (bench/broker_queue_cost.py, the persistent variant, or the transient one with
--transient-host-messages; needs `pip install pika`, skipped with --no-floor) and prints dog's
broker share as a ratio to it.

Usage (as root, after `cargo build --release --bins`):
  python3 bench/fleet_propagation.py [--agents 5000] [--rounds 3] [--profile release] [--no-floor]
                                     [--transient-host-messages]
"""
import os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from broker import broker_cpu_seconds, cpu_seconds  # noqa: E402
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
    def extra(ap):
        ap.add_argument("--no-floor", action="store_true",
                        help="skip measuring the broker's floor for the same queues after the rounds")
        ap.add_argument("--transient-host-messages", action="store_true",
                        help="run the operator with --transient-host-messages (and compare with "
                             "the transient floor)")
    a, bindir = bench_args(5000, extra)
    prefix = f"dogsim{os.getpid() % 10000}"
    work = tempfile.mkdtemp(prefix="dog-sim-")
    d = os.path.join(work, "fleet")
    os.makedirs(d)
    procs = []
    broker_shares = []
    finished = False
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
                               "--log-format", "json"]
                              + (["--transient-host-messages"] if a.transient_host_messages else []),
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
        lat_all = []
        for r in range(a.rounds):
            # while hosts joined, the Group's set grew and the operator sent it again: a round
            # starts once every pass has ended and every Apply is answered
            deadline = time.time() + 300
            while not acks.settled():
                if time.time() > deadline:
                    sys.exit(f"the operator did not settle before round {r} (see {work})")
                time.sleep(0.2)
            time.sleep(1)
            cpu0 = (broker_cpu_seconds(), cpu_seconds(op.pid), cpu_seconds(sim.pid))
            t0 = time.time()
            rules(d, 8001 + r)  # a port changes: every host's rules are rendered anew
            deadline = time.time() + 120
            while True:
                got = acks.after(t0)
                if len(got) >= a.agents or time.time() > deadline:
                    break
                time.sleep(0.05)
            cpu = [after - before for before, after in
                   zip(cpu0, (broker_cpu_seconds(), cpu_seconds(op.pid), cpu_seconds(sim.pid)))]
            broker_shares.append(cpu[0])
            lat = [t - t0 for t in got.values()]
            lat_all.extend(lat + [float("inf")] * (a.agents - len(lat)))
            print(f"round {r}: {len(lat)}/{a.agents} acked, p50 {pct(lat, 50):.3f} s, "
                  f"last after {max(lat) if lat else float('nan'):.3f} s; CPU until then: "
                  f"broker {cpu[0]:.2f} s, operator {cpu[1]:.2f} s, simulator {cpu[2]:.2f} s",
                  flush=True)
        peak = rss_kb(op.pid, "VmHWM")
        broker_after = broker_memory_mib()
        print()
        print(f"simulated hosts: {a.agents}, rounds: {a.rounds}, profile: {a.profile}, host "
              f"messages: {'transient' if a.transient_host_messages else 'persistent'}")
        print(f"profile change -> host ack: p50 {pct(lat_all, 50) * 1000:.0f} ms, "
              f"p99 {pct(lat_all, 99) * 1000:.0f} ms, max {max(lat_all) * 1000:.0f} ms  (goal: p99 < 2000 ms)")
        print(f"operator peak RSS: {peak / 1024:.1f} MiB; broker memory {broker_before:.0f} -> "
              f"{broker_after:.0f} MiB with {a.agents} host queues")
        finished = True
    finally:
        # a run that did not finish keeps its logs: they are what says why
        stop_all(procs, f"{prefix}-none", prefix, work, keep=not finished)
    if broker_shares and not a.no_floor:
        broker_floor(a.agents, broker_shares, 1 if a.transient_host_messages else 2)


def broker_floor(agents, shares, mode):
    """The broker's cost of the same pattern from a plain client, measured now, beside dog's."""
    try:
        import broker_queue_cost
    except ImportError as e:
        print(f"broker floor not measured ({e}; pip install pika)")
        return
    floor = [c for c, _ in broker_queue_cost.variant(agents, 3, mode, False, 0)[1:]]
    kind = "transient" if mode == 1 else "persistent"
    print(f"broker CPU per round: dog {min(shares):.2f}-{max(shares):.2f} s; a plain client's "
          f"{kind} floor for {agents} queues now {min(floor):.2f}-{max(floor):.2f} s "
          f"(dog/floor {min(shares) / max(floor):.2f}-{max(shares) / min(floor):.2f})")


if __name__ == "__main__":
    main()
