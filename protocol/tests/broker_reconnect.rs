//! Connections killed by the broker in the middle of a stream: every message still arrives
//! exactly once at the application level (dedup by message id), none is lost, in both
//! directions.

mod broker_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_support::*;
use dog_protocol::broker::{AckOutcome, AgentLink, MessageMeta, OperatorLink};
use tokio::sync::Mutex;

const MESSAGES: usize = 500;

/// Long because it is one run: publishers, consumers and the connection killer share the
/// counts the assertions at the end read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_once_across_connection_kills() {
    init_tracing();
    let prefix = unique_prefix("kill");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-k");
    let mut c = config(&prefix, "operator");
    // Every message matters here, so the host queue is unbounded.
    c.host_queue_max_length = None;
    let (operator, mut from_agent) = OperatorLink::start(c.clone()).unwrap();
    connected("operator", operator.wait_connected()).await;
    operator.declare_host_queue("node-k").await.unwrap();
    let mut ca = c.clone();
    ca.connection_name = format!("{prefix}/agent");
    let (agent, mut to_agent) = AgentLink::start(ca, "node-k").unwrap();
    connected("agent", agent.wait_connected()).await;

    // Agent: process each new request once (dedup by id), answer it, then ack.
    let agent_seen = Arc::new(Mutex::new((
        HashSet::<String>::new(),
        0usize,
        0usize,
        0usize,
    )));
    let agent_task = {
        let agent = agent.clone();
        let seen = agent_seen.clone();
        tokio::spawn(async move {
            while let Some(d) = to_agent.recv().await {
                let id = d.message_id.clone().expect("message id");
                let fresh = {
                    let mut s = seen.lock().await;
                    if d.redelivered {
                        s.2 += 1;
                    }
                    let fresh = s.0.insert(id.clone());
                    if !fresh {
                        s.1 += 1;
                    }
                    fresh
                };
                // Answer (again, if this is a redelivery: the first answer may be lost).
                agent
                    .publish_to_operator(
                        format!("done {id}").as_bytes(),
                        &MessageMeta::new(format!("r-{id}"), "response"),
                    )
                    .await
                    .expect("response published");
                let _ = fresh;
                if d.acker.ack().await == AckOutcome::Stale {
                    seen.lock().await.3 += 1;
                }
            }
        })
    };

    // Operator: collect responses (dedup by id), acking each.
    let responses = Arc::new(Mutex::new(HashSet::<String>::new()));
    let operator_task = {
        let responses = responses.clone();
        tokio::spawn(async move {
            while let Some(d) = from_agent.recv().await {
                responses
                    .lock()
                    .await
                    .insert(d.message_id.clone().expect("id"));
                d.acker.ack().await;
            }
        })
    };

    // Kill both connections twice while the stream runs.
    let killer = {
        let prefix = prefix.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            let first = kill_connections(&prefix);
            std::thread::sleep(Duration::from_millis(700));
            let second = kill_connections(&prefix);
            first + second
        })
    };

    let started = Instant::now();
    for i in 0..MESSAGES {
        operator
            .publish_to_host(
                "node-k",
                format!("request {i}").as_bytes(),
                &MessageMeta::new(format!("m-{i}"), "desired-state"),
            )
            .await
            .expect("publish eventually confirmed");
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let killed = killer.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agent_count = agent_seen.lock().await.0.len();
        let response_count = responses.lock().await.len();
        if agent_count == MESSAGES && response_count == MESSAGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost messages: agent saw {agent_count}/{MESSAGES}, operator got {response_count}/{MESSAGES} responses"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen, duplicates, redelivered, stale_acks) = {
        let s = agent_seen.lock().await;
        (s.0.clone(), s.1, s.2, s.3)
    };
    let expected: HashSet<String> = (0..MESSAGES).map(|i| format!("m-{i}")).collect();
    assert_eq!(seen, expected);
    let op = operator.status();
    let ag = agent.status();
    eprintln!(
        "{MESSAGES} messages in {:?}: killed {killed} connections; agent duplicates {duplicates} \
         (redelivered flag {redelivered}), stale acks {stale_acks}; operator {op:?}; agent {ag:?}",
        started.elapsed()
    );
    assert!(killed >= 3, "the kills hit our connections ({killed})");
    assert!(op.disconnects >= 1 && ag.disconnects >= 1);
    assert!(op.connected && ag.connected);
    assert_eq!(op.connects, op.disconnects + 1);

    agent.close();
    operator.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), operator_task).await;
}
