"""Broker housekeeping shared by the bench scripts."""
import subprocess

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
