//! Broker transport benchmarks against the real RabbitMQ at 127.0.0.1:5672 (guest/guest).
//!
//! * `roundtrip_small`: operator publish (confirmed) → agent delivery → ack, 64-byte body.
//! * `confirmed_publish/sequential`: one publish at a time, each awaiting its confirm.
//! * `confirmed_publish/concurrent_1000`: 1,000 publishes with 256 in flight.
//! * `fanout_1000_hosts/individual`: one update to 1,000 host queues as 1,000 publishes,
//!   timed until the last queue has delivered it to its consumer.
//! * `fanout_1000_hosts/shared_set`: the same update as ONE shared-set publish.
//!
//! Run: `cargo bench -p dog-protocol --bench broker`. The 1,000 host queues are classic
//! durable queues here: on this single-node test broker (2 cores, shared) 1,000 quorum
//! queues make it stop accepting connections, see docs/broker.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dog_protocol::broker::{AgentLink, Backoff, BrokerConfig, MessageMeta, OperatorLink};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, Mutex};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const FANOUT: usize = 1000;

fn config(prefix: &str, name: &str) -> BrokerConfig {
    let mut c = BrokerConfig::new(URL, format!("{prefix}/{name}"));
    c.topology_prefix = prefix.to_string();
    c.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(500),
    };
    c
}

fn prefix(name: &str) -> String {
    format!("dogb-{name}-{}", std::process::id())
}

fn body() -> Vec<u8> {
    vec![0xAB; 64]
}

fn roundtrip_and_publish(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let p = prefix("rt");
    let (operator, agent, deliveries) = rt.block_on(async {
        let (operator, _from) = OperatorLink::start(config(&p, "operator")).expect("operator");
        operator.wait_connected().await.expect("connected");
        operator
            .declare_host_queue("bench-a")
            .await
            .expect("declare");
        let (agent, deliveries) = AgentLink::start(config(&p, "agent"), "bench-a").expect("agent");
        agent.wait_connected().await.expect("agent connected");
        (operator, agent, Arc::new(Mutex::new(deliveries)))
    });
    let payload = body();
    let mut n = 0u64;
    c.bench_function("broker/roundtrip_small", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let meta = MessageMeta::new(format!("rt-{n}"), "bench");
            let (operator, deliveries, payload) = (operator.clone(), deliveries.clone(), &payload);
            async move {
                operator
                    .publish_to_host("bench-a", payload, &meta)
                    .await
                    .expect("publish");
                let d = deliveries.lock().await.recv().await.expect("delivery");
                d.acker.ack().await;
            }
        })
    });
    agent.close();

    // Publishes to a bounded queue nobody consumes (drop-head keeps it at 64 messages).
    let mut group = c.benchmark_group("broker/confirmed_publish");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sequential", |b| {
        b.to_async(&rt).iter(|| {
            let operator = operator.clone();
            let payload = &payload;
            async move {
                operator
                    .publish_to_host("bench-a", payload, &MessageMeta::new("p", "bench"))
                    .await
                    .expect("publish")
            }
        })
    });
    group.throughput(Throughput::Elements(1000));
    group.sample_size(10);
    group.bench_function("concurrent_1000", |b| {
        b.to_async(&rt).iter(|| {
            let operator = operator.clone();
            let payload = &payload;
            async move {
                futures::stream::iter(0..1000)
                    .map(|i| {
                        let operator = operator.clone();
                        async move {
                            operator
                                .publish_to_host(
                                    "bench-a",
                                    payload,
                                    &MessageMeta::new(format!("c-{i}"), "bench"),
                                )
                                .await
                        }
                    })
                    .buffer_unordered(256)
                    .for_each(|r| async move { r.expect("publish") })
                    .await
            }
        })
    });
    group.finish();
    rt.block_on(async {
        operator.delete_host_queue("bench-a").await.expect("delete");
        operator.delete_topology().await.expect("delete topology");
    });
    operator.close();
}

/// Long because it sets up 1,000 queues and consumers once for both measurements.
fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let p = prefix("fan");
    let hosts: Vec<String> = (0..FANOUT).map(|i| format!("f{i:04}")).collect();
    let (operator, conn, mut delivered) = rt.block_on(async {
        let mut cfg = config(&p, "operator");
        cfg.quorum_queues = false;
        let (operator, _from) = OperatorLink::start(cfg).expect("operator");
        operator.wait_connected().await.expect("connected");
        futures::stream::iter(hosts.iter())
            .map(|h| operator.declare_host_queue(h))
            .buffer_unordered(32)
            .for_each(|r| async move { r.expect("declare") })
            .await;
        // One consumer per host queue (standing in for 1,000 agents), all bound to the set
        // as agents do with bind_shared_set.
        let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
            .await
            .expect("consumer connection");
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let mut channels = Vec::new();
        for _ in 0..8 {
            let ch = conn.create_channel().await.expect("channel");
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .expect("qos");
            channels.push(ch);
        }
        for (i, h) in hosts.iter().enumerate() {
            let ch = &channels[i % channels.len()];
            let queue = operator.topology().host_queue(h);
            ch.queue_bind(
                queue.clone().into(),
                operator.topology().sets_exchange().into(),
                "bench-set".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
            let mut consumer = ch
                .basic_consume(
                    queue.into(),
                    format!("bench-{h}").into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(_)) = consumer.next().await {
                    let _ = tx.send(());
                }
            });
        }
        (operator, conn, rx)
    });
    let payload = body();
    let mut group = c.benchmark_group("broker/fanout_1000_hosts");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("individual", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for it in 0..iters {
                    let start = Instant::now();
                    futures::stream::iter(hosts.iter())
                        .map(|h| {
                            let meta = MessageMeta::new(format!("i-{it}-{h}"), "bench");
                            let operator = operator.clone();
                            let payload = &payload;
                            async move { operator.publish_to_host(h, payload, &meta).await }
                        })
                        .buffer_unordered(256)
                        .for_each(|r| async move { r.expect("publish") })
                        .await;
                    for _ in 0..FANOUT {
                        delivered.recv().await.expect("delivery");
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    group.bench_function("shared_set", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for it in 0..iters {
                    let start = Instant::now();
                    operator
                        .publish_shared_set(
                            "bench-set",
                            &payload,
                            &MessageMeta::new(format!("s-{it}"), "bench"),
                        )
                        .await
                        .expect("publish");
                    for _ in 0..FANOUT {
                        delivered.recv().await.expect("delivery");
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    group.finish();
    rt.block_on(async {
        let _ = conn.close(200, "done".into()).await;
        futures::stream::iter(hosts.iter())
            .map(|h| operator.delete_host_queue(h))
            .buffer_unordered(16)
            .for_each(|r| async move { r.expect("delete") })
            .await;
        operator.delete_topology().await.expect("delete topology");
    });
    operator.close();
}

criterion_group!(benches, roundtrip_and_publish, fanout);
criterion_main!(benches);
