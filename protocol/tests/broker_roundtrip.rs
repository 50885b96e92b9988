//! Operator → agent and agent → operator through the real RabbitMQ, with publisher
//! confirms and manual acknowledgements.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use dog_protocol::broker::{AckOutcome, AgentLink, BrokerError, MessageMeta, OperatorLink};

#[tokio::test]
async fn round_trip_both_directions_with_manual_acks() {
    init_tracing();
    let prefix = unique_prefix("rt");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-a");

    let (operator, mut from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;
    let (agent, mut to_agent) = AgentLink::start(config(&prefix, "agent-a"), "node-a").unwrap();
    connected("agent", agent.wait_connected()).await;
    assert!(operator.status().connected && agent.status().connected);
    assert_eq!(operator.status().connects, 1);

    // Operator → agent.
    operator
        .publish_to_host(
            "node-a",
            b"desired state r1",
            &MessageMeta::new("m-1", "desired-state"),
        )
        .await
        .unwrap();
    let d = next_within(&mut to_agent, Duration::from_secs(5))
        .await
        .expect("agent got it");
    assert_eq!(d.body, b"desired state r1");
    assert_eq!(d.message_id.as_deref(), Some("m-1"));
    assert_eq!(d.kind.as_deref(), Some("desired-state"));
    assert!(!d.redelivered);
    assert_eq!(d.acker.ack().await, AckOutcome::Done);

    // Agent → operator.
    agent
        .publish_to_operator(b"response to m-1", &MessageMeta::new("r-1", "response"))
        .await
        .unwrap();
    let r = next_within(&mut from_agents, Duration::from_secs(5))
        .await
        .expect("operator got it");
    assert_eq!(r.body, b"response to m-1");
    assert_eq!(r.message_id.as_deref(), Some("r-1"));
    assert_eq!(r.kind.as_deref(), Some("response"));
    assert_eq!(r.acker.ack().await, AckOutcome::Done);

    // Nothing else is waiting.
    assert!(next_within(&mut to_agent, Duration::from_millis(200))
        .await
        .is_none());
    assert!(next_within(&mut from_agents, Duration::from_millis(200))
        .await
        .is_none());

    agent.close();
    operator.delete_host_queue("node-a").await.unwrap();
    operator.delete_topology().await.unwrap();
    assert!(!operator.status().connected || operator.wait_connected().await.is_err());
}

#[tokio::test]
async fn unacked_delivery_is_redelivered_to_the_next_agent_connection() {
    init_tracing();
    let prefix = unique_prefix("redeliver");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-b");

    let (operator, _from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;
    operator
        .publish_to_host("node-b", b"work", &MessageMeta::new("m-9", "desired-state"))
        .await
        .unwrap();

    let (agent, mut to_agent) = AgentLink::start(config(&prefix, "agent-b1"), "node-b").unwrap();
    let first = next_within(&mut to_agent, Duration::from_secs(5))
        .await
        .expect("first delivery");
    assert!(!first.redelivered);
    // The agent dies before finishing its work: no ack.
    agent.close();
    drop(to_agent);

    let (agent2, mut to_agent2) = AgentLink::start(config(&prefix, "agent-b2"), "node-b").unwrap();
    let again = next_within(&mut to_agent2, Duration::from_secs(5))
        .await
        .expect("redelivered");
    assert_eq!(again.message_id.as_deref(), Some("m-9"));
    assert!(again.redelivered);
    // Acking the first (stale) delivery must not crash and must not ack the new one.
    assert_eq!(first.acker.ack().await, AckOutcome::Stale);
    assert_eq!(again.acker.ack().await, AckOutcome::Done);
    agent2.close();
    operator.close();
}

/// One acknowledgement of the last delivery of a batch covers the whole batch: after the
/// consumer's connection is gone, none of them comes back.
#[tokio::test]
async fn ack_through_acknowledges_every_earlier_delivery_too() {
    init_tracing();
    let prefix = unique_prefix("ackthrough");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-c");

    let (operator, _from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;
    for i in 0..3 {
        operator
            .publish_to_host(
                "node-c",
                format!("work {i}").as_bytes(),
                &MessageMeta::new(format!("m-{i}"), "desired-state"),
            )
            .await
            .unwrap();
    }
    let (agent, mut to_agent) = AgentLink::start(config(&prefix, "agent-c1"), "node-c").unwrap();
    let mut batch = Vec::new();
    for _ in 0..3 {
        batch.push(
            next_within(&mut to_agent, Duration::from_secs(5))
                .await
                .expect("a delivery of the batch"),
        );
    }
    let last = batch.pop().expect("three deliveries");
    assert_eq!(last.message_id.as_deref(), Some("m-2"));
    assert_eq!(last.acker.ack_through().await, AckOutcome::Done);
    agent.close();
    drop(to_agent);

    let (agent2, mut to_agent2) = AgentLink::start(config(&prefix, "agent-c2"), "node-c").unwrap();
    connected("agent", agent2.wait_connected()).await;
    let again = next_within(&mut to_agent2, Duration::from_secs(2)).await;
    assert!(
        again.is_none(),
        "redelivered although acknowledged: {:?}",
        again.and_then(|d| d.message_id)
    );
    agent2.close();
    operator.close();
}

#[tokio::test]
async fn bad_names_are_refused_before_touching_the_broker() {
    let prefix = unique_prefix("names");
    let _cleanup = Cleanup::new(&prefix);
    let (operator, _d) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    let err = operator
        .publish_to_host("bad host/with slash", b"x", &MessageMeta::new("1", "t"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::InvalidName { field: "host", .. }),
        "{err}"
    );
    let err = AgentLink::start(config(&prefix, "a"), "")
        .err()
        .expect("empty hostname refused");
    assert!(
        matches!(
            err,
            BrokerError::InvalidName {
                field: "hostname",
                ..
            }
        ),
        "{err}"
    );
    operator.close();
}
