//! One shared-set publish reaches every agent queue bound to the set exactly once.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use dog_protocol::broker::{AckOutcome, AgentLink, BrokerError, MessageMeta, OperatorLink};

#[tokio::test]
async fn one_publish_reaches_every_bound_agent_once() {
    init_tracing();
    let prefix = unique_prefix("sets");
    let mut cleanup = Cleanup::new(&prefix);
    let (operator, _from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;

    // Five agents use set "blocklist", a sixth does not.
    let mut agents = Vec::new();
    for i in 0..6 {
        let host = format!("node-{i}");
        cleanup.host(&host);
        let (agent, deliveries) = AgentLink::start(config(&prefix, &host), &host).unwrap();
        connected("agent", agent.wait_connected()).await;
        if i < 5 {
            agent.bind_shared_set("blocklist").await.unwrap();
            agent.bind_shared_set("bastions").await.unwrap();
        }
        agents.push((agent, deliveries));
    }

    operator
        .publish_shared_set(
            "blocklist",
            b"set v7",
            &MessageMeta::new("s-7", "set-update"),
        )
        .await
        .unwrap();
    for (i, (_agent, deliveries)) in agents.iter_mut().enumerate() {
        if i < 5 {
            let d = next_within(deliveries, Duration::from_secs(5))
                .await
                .expect("bound agent gets the set");
            assert_eq!(d.body, b"set v7");
            assert_eq!(d.message_id.as_deref(), Some("s-7"));
            assert_eq!(d.acker.ack().await, AckOutcome::Done);
        }
        // Exactly once: nothing more (and nothing at all for the unbound agent).
        assert!(
            next_within(deliveries, Duration::from_millis(150))
                .await
                .is_none(),
            "agent {i}"
        );
    }

    // After unbinding, agent 0 no longer receives the set; the others still do.
    agents[0].0.unbind_shared_set("blocklist").await.unwrap();
    assert_eq!(agents[0].0.shared_sets(), vec!["bastions".to_string()]);
    operator
        .publish_shared_set(
            "blocklist",
            b"set v8",
            &MessageMeta::new("s-8", "set-update"),
        )
        .await
        .unwrap();
    for (i, (_agent, deliveries)) in agents.iter_mut().enumerate() {
        let got = next_within(
            deliveries,
            Duration::from_millis(if (1..5).contains(&i) { 5000 } else { 200 }),
        )
        .await;
        match (i, got) {
            (1..=4, Some(d)) => {
                assert_eq!(d.message_id.as_deref(), Some("s-8"));
                d.acker.ack().await;
            }
            (1..=4, None) => panic!("agent {i} missed s-8"),
            (_, Some(d)) => panic!("agent {i} got {:?} though not bound", d.message_id),
            (_, None) => {}
        }
    }

    // A set nobody uses is unroutable: reported, not silently dropped.
    let mut c = config(&prefix, "operator-2");
    c.unroutable_retries = 1;
    let (op2, _d2) = OperatorLink::start(c).unwrap();
    let err = op2
        .publish_shared_set(
            "nobody-uses-this",
            b"x",
            &MessageMeta::new("s-0", "set-update"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::Unroutable { attempts: 2, .. }),
        "{err}"
    );

    for (agent, _) in &agents {
        agent.close();
    }
    op2.close();
    operator.close();
}
