#!/usr/bin/env python3
"""The broker's own cost of one fleet-wide change, without dog: what RabbitMQ spends to take
one message into each of N host queues, deliver it, take its ack and carry one answer per host
into one inbox queue. A plain AMQP client does the work, so the numbers are the broker's floor
for the pattern dog's Applies follow, measured beside dog's own round in the same session.

    pip install pika            # the AMQP client this script uses
    python3 bench/broker_queue_cost.py --hosts 5000 --rounds 3

Each variant declares N classic durable queues (`x-max-length` 8, drop-head, as the operator
declares host queues), runs `--rounds` rounds (the first one is the queues' first message and is
reported apart) and prints the broker's CPU seconds per round (utime + stime of `beam.smp` from
/proc) and the wall time. Variants:

* persistent / transient: `delivery_mode` 2 or 1;
* confirm: every publish waits for its publisher confirm (one at a time, so each queue has to
  make its message durable before the next publish);
* bcc-64: one publish per 64 hosts routed with the `BCC` header (sender-selected distribution),
  the body grown by 80 bytes per recipient as a key wrapped per host would grow it.

Run as root on the machine the broker runs on (it reads the broker's /proc entries).
"""
import argparse
import os
import time

import pika

from broker import broker_cpu_seconds, delete_queues

PREFIX = "dog-brokercost"
APPLY_BYTES = 6417  # a Profile change's Apply to one of 5,000 hosts, sealed
ANSWER_BYTES = 900


def variant(hosts, rounds, mode, confirm, bcc):
    """Broker CPU-s and wall s of each round; the variant's queues and exchange are deleted
    however it ends."""
    try:
        return rounds_of(hosts, rounds, mode, confirm, bcc)
    finally:
        delete_queues(PREFIX)
        with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")) as conn:
            conn.channel().exchange_delete(f"{PREFIX}.hosts")


def rounds_of(hosts, rounds, mode, confirm, bcc):
    params = pika.ConnectionParameters("127.0.0.1")
    pub_conn, con_conn = pika.BlockingConnection(params), pika.BlockingConnection(params)
    pub, con = pub_conn.channel(), con_conn.channel()
    if confirm:
        pub.confirm_delivery()
    exchange, inbox = f"{PREFIX}.hosts", f"{PREFIX}.inbox"
    pub.exchange_declare(exchange, "direct", durable=True)
    pub.queue_declare(inbox, durable=True,
                      arguments={"x-max-length": 100000, "x-overflow": "reject-publish"})
    names = [f"h{i}" for i in range(hosts)]
    for h in names:
        q = f"{PREFIX}.q.{h}"
        pub.queue_declare(q, durable=True,
                          arguments={"x-max-length": 8, "x-overflow": "drop-head"})
        pub.queue_bind(q, exchange, h)
    got, answered = [0], [0]
    answer = os.urandom(ANSWER_BYTES)

    def on_apply(ch, m, _props, _body):
        ch.basic_publish("", inbox, answer, pika.BasicProperties(delivery_mode=mode))
        ch.basic_ack(m.delivery_tag)
        got[0] += 1

    def on_answer(ch, m, _props, _body):
        ch.basic_ack(m.delivery_tag)
        answered[0] += 1

    con.basic_qos(prefetch_count=64)
    for h in names:
        con.basic_consume(f"{PREFIX}.q.{h}", on_apply)
    pub.basic_qos(prefetch_count=64)
    pub.basic_consume(inbox, on_answer)
    step = bcc or 1
    body = os.urandom(APPLY_BYTES + (80 * step if bcc else 0))
    results = []
    for _ in range(rounds):
        got[0] = answered[0] = 0
        cpu0, t0 = broker_cpu_seconds(), time.monotonic()
        for i in range(0, hosts, step):
            chunk = names[i:i + step]
            headers = {"BCC": chunk[1:]} if bcc else None
            pub.basic_publish(exchange, chunk[0], body,
                              pika.BasicProperties(delivery_mode=mode, headers=headers),
                              mandatory=True)
        deadline = time.monotonic() + 600
        while got[0] < hosts or answered[0] < hosts:
            if time.monotonic() > deadline:
                raise SystemExit(f"round incomplete after 600 s: {got[0]} delivered, "
                                 f"{answered[0]} answered of {hosts}")
            con_conn.process_data_events(0.01)
            pub_conn.process_data_events(0.01)
        results.append((broker_cpu_seconds() - cpu0, time.monotonic() - t0))
        time.sleep(2)
    pub_conn.close()
    con_conn.close()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="persistent,transient,persistent+confirm,"
                    "transient+confirm,persistent+bcc-64")
    args = ap.parse_args()
    print(f"{args.hosts} host queues, {args.rounds} rounds per variant; broker CPU-s and wall s "
          f"per round (first round = each queue's first message)")
    for name in args.variants.split(","):
        parts = name.split("+")
        mode = 2 if parts[0] == "persistent" else 1
        bcc = next((int(p.split("-")[1]) for p in parts if p.startswith("bcc-")), 0)
        res = variant(args.hosts, args.rounds, mode, "confirm" in parts, bcc)
        first, rest = res[0], res[1:]
        warm = ", ".join(f"{c:.2f} CPU-s / {w:.2f} s" for c, w in rest)
        print(f"{name:22} first {first[0]:.2f} CPU-s / {first[1]:.2f} s; then {warm}",
              flush=True)


if __name__ == "__main__":
    main()
