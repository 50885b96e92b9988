//! One operator connection declares and serves 1,000 host queues.
//!
//! Classic durable queues: 1,000 quorum queues make the single-node test broker stop
//! accepting connections (docs/broker.md, "Cost of quorum queues"). `DOG_TEST_QUORUM=1`
//! switches to quorum queues and `DOG_TEST_HOSTS=<n>` changes the count, for exploring.

mod broker_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use broker_support::*;
use dog_protocol::broker::{MessageMeta, OperatorLink};
use futures::StreamExt;
use lapin::options::BasicGetOptions;

const HOSTS: usize = 1000;

fn hosts() -> usize {
    std::env::var("DOG_TEST_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HOSTS)
}

#[tokio::test]
async fn thousand_host_queues_on_one_connection() {
    init_tracing();
    let prefix = unique_prefix("many");
    let mut cleanup = Cleanup::new(&prefix);
    let n = hosts();
    let hosts: Vec<String> = (0..n).map(|i| format!("h{i:04}")).collect();
    for h in &hosts {
        cleanup.host(h);
    }
    let mut c = config(&prefix, "operator");
    c.quorum_queues = std::env::var("DOG_TEST_QUORUM").is_ok();
    let (operator, _from_agents) = OperatorLink::start(c).unwrap();
    connected("operator", operator.wait_connected()).await;

    let t0 = Instant::now();
    futures::stream::iter(hosts.iter())
        .map(|h| {
            let operator = operator.clone();
            async move {
                operator
                    .publish_to_host(
                        h,
                        format!("state for {h}").as_bytes(),
                        &MessageMeta::new(format!("m-{h}"), "desired-state"),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .unwrap();
    eprintln!("declared + published {n} host queues in {:?}", t0.elapsed());
    assert_eq!(operator.status().connects, 1, "all on one connection");

    // Every queue holds exactly its own message.
    let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut seen = HashSet::new();
    for h in &hosts {
        let queue = operator.topology().host_queue(h);
        let got = ch
            .basic_get(queue.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{queue} is empty"));
        assert_eq!(got.delivery.data, format!("state for {h}").as_bytes());
        assert_eq!(got.message_count, 0, "{queue} holds more than one message");
        seen.insert(h.clone());
    }
    assert_eq!(seen.len(), n);
    let _ = conn.close(200, "done".into()).await;

    let t1 = Instant::now();
    futures::stream::iter(hosts.iter())
        .map(|h| operator.delete_host_queue(h))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .unwrap();
    eprintln!("deleted {n} host queues in {:?}", t1.elapsed());
    let _ = tokio::time::timeout(Duration::from_secs(5), operator.delete_topology()).await;
    operator.close();
}
