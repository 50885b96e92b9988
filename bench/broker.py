"""Broker housekeeping shared by the bench scripts, and the CPU time of the processes a bench
compares."""
import os
import subprocess

_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TCK


def broker_cpu_seconds():
    """CPU seconds of the local broker's Erlang VM (every `beam.smp` process) so far."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "beam.smp":
                    continue
        except OSError:
            continue
        total += cpu_seconds(pid)
    return total

# One call for every queue of a run: `rabbitmqctl delete_queue` costs about a second per call,
# so deleting 200 host queues one by one takes minutes and overlaps (and loads) the next run.
_DELETE_BY_PREFIX = (
    "length([rabbit_amqqueue:delete(Q, false, false, <<\"dog-bench\">>)"
    " || Q <- rabbit_amqqueue:list(<<\"/\">>),"
    " binary:match(element(4, amqqueue:get_name(Q)), <<\"{prefix}.\">>) =:= {{0, {n}}}])."
)


def delete_queues(prefix):
    """Deletes every queue named `<prefix>.…` on the local broker."""
    expr = _DELETE_BY_PREFIX.format(prefix=prefix, n=len(prefix) + 1)
    if subprocess.run(["rabbitmqctl", "eval", expr], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0:
        return
    # a broker without that internal API: the slow way
    q = subprocess.run(["rabbitmqctl", "list_queues", "-q", "name"], capture_output=True, text=True)
    for name in q.stdout.split():
        if name.startswith(prefix + "."):
            subprocess.run(["rabbitmqctl", "delete_queue", name], stdout=subprocess.DEVNULL)
