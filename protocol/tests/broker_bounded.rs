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
    connected("operator", operator.wait_connected()).await;
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

/// The operator's inbox refuses rather than drops: once full, an agent's publish is nacked and
/// retried until the operator has made room, and every message arrives.
#[tokio::test]
async fn a_full_operator_inbox_refuses_publishes_and_loses_nothing() {
    init_tracing();
    let prefix = unique_prefix("inbox");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-i");
    let mut c = config(&prefix, "operator");
    c.operator_queue_max_length = 3;
    c.operator_prefetch = 1;
    let (operator, mut from_agents) = OperatorLink::start(c).unwrap();
    connected("operator", operator.wait_connected()).await;
    let (agent, _to_agent) = AgentLink::start(config(&prefix, "agent"), "node-i").unwrap();
    connected("agent", agent.wait_connected()).await;
    // the operator reads nothing yet: one delivery in flight (prefetch 1) and 3 waiting fit,
    // in whatever split the client's buffer makes; a few more than that must not
    let mut confirmed = 0;
    let mut refused_at = None;
    for i in 0..10 {
        let meta = MessageMeta::new(format!("k-{i}"), "keepalive");
        let publish = agent.publish_to_operator(b"keepalive", &meta);
        match tokio::time::timeout(Duration::from_secs(2), publish).await {
            Ok(r) => {
                r.unwrap();
                confirmed += 1;
            }
            Err(_) => {
                refused_at = Some(i);
                break;
            }
        }
    }
    let refused_at = refused_at.expect("a full inbox refuses a publish");
    assert!(
        (3..=6).contains(&confirmed),
        "{confirmed} confirmed before the refusal"
    );
    // the operator sees its backlog: the inbox at its bound (the broker may count the one
    // delivered but unacknowledged too)
    let depth = operator.inbox_depth().await.unwrap();
    assert!((3..=4).contains(&depth), "inbox depth {depth}");
    // the operator drains: the refused one is published again and arrives, nothing is lost
    let retry = tokio::spawn({
        let meta = MessageMeta::new(format!("k-{refused_at}"), "keepalive");
        async move {
            agent
                .publish_to_operator(b"keepalive", &meta)
                .await
                .map(|_| agent)
        }
    });
    let mut ids = Vec::new();
    while ids.len() < confirmed + 1 {
        let d = next_within(&mut from_agents, Duration::from_secs(20))
            .await
            .expect("every confirmed message arrives");
        ids.push(d.message_id.clone().unwrap_or_default());
        d.acker.ack().await;
    }
    let agent = tokio::time::timeout(Duration::from_secs(20), retry)
        .await
        .expect("the refused publish goes through once there is room")
        .unwrap()
        .unwrap();
    let mut want: Vec<String> = (0..confirmed).map(|i| format!("k-{i}")).collect();
    want.push(format!("k-{refused_at}"));
    ids.sort();
    want.sort();
    ids.dedup();
    assert_eq!(ids, want);
    agent.close();
    operator.close();
}
