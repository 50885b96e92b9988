//! A bounded host queue keeps only the newest messages (x-max-length, drop-head).

mod broker_support;

use std::time::Duration;

use broker_support::*;
use dog_protocol::broker::{AgentLink, MessageMeta, OperatorLink};

#[tokio::test]
async fn only_the_newest_eight_remain() {
    init_tracing();
    let prefix = unique_prefix("bounded");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-q");
    let mut c = config(&prefix, "operator");
    c.host_queue_max_length = Some(8);
    let (operator, _from_agents) = OperatorLink::start(c.clone()).unwrap();
    operator.wait_connected().await.unwrap();
    for i in 0..100 {
        operator
            .publish_to_host(
                "node-q",
                format!("state {i}").as_bytes(),
                &MessageMeta::new(format!("m-{i}"), "desired-state"),
            )
            .await
            .unwrap();
    }
    // The agent starts later and finds only the newest 8 (same queue arguments).
    let (agent, mut deliveries) = AgentLink::start(c, "node-q").unwrap();
    let mut ids = Vec::new();
    while let Some(d) = next_within(&mut deliveries, Duration::from_millis(500)).await {
        ids.push(d.message_id.clone().unwrap());
        d.acker.ack().await;
    }
    let expected: Vec<String> = (92..100).map(|i| format!("m-{i}")).collect();
    assert_eq!(ids, expected);
    agent.close();
    operator.close();
}
