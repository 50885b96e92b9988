//! The broker users of docs/broker.md, with exactly the permissions `Topology` writes:
//! a node's own user can use its own queue, its shared-set bindings and `dog.operator`, and is
//! refused another host's queue; the bootstrap user can only use the queue the broker named for
//! its connection and publish to `dog.operator`; and the `user-id` the operator reads is the
//! one the broker checked.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use dog_protocol::broker::{
    AckOutcome, AgentLink, BrokerError, Credentials, MessageMeta, OperatorLink, Permissions,
    Topology,
};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// A broker user with these permissions in vhost `/`, deleted on drop.
fn add_user(name: String, password: &str, p: &Permissions) -> User {
    rabbitmqctl(&["add_user", &name, password]);
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &name,
        &p.configure,
        &p.write,
        &p.read,
    ]);
    User(name)
}

fn assert_refused(err: lapin::Error) {
    let e = err.to_string();
    assert!(
        e.contains("ACCESS_REFUSED") || e.contains("ACCESS-REFUSED"),
        "{e}"
    );
}

/// Waits until `cond` holds, failing after `secs`.
async fn eventually(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn agent_user_reaches_only_its_own_queue() {
    init_tracing();
    let prefix = unique_prefix("perm");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-p.example");
    cleanup.host("node-other");
    let topology = Topology::new(prefix.clone());
    let password = format!("pw-{}", std::process::id());
    // the node user the operator provisions for `node-p.example`
    let user = add_user(
        topology.node_user("node-p.example"),
        &password,
        &topology.node_permissions("node-p.example"),
    );

    let (operator, mut from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;
    operator.declare_host_queue("node-p.example").await.unwrap();
    operator.declare_host_queue("node-other").await.unwrap();

    let agent_config = |name: &str| {
        let mut c = config(&prefix, name);
        c.url = "amqp://127.0.0.1:5672/%2f".into();
        c.credentials = Some(Credentials {
            username: user.0.clone(),
            password: password.clone(),
        });
        c
    };
    let (agent, mut to_agent) =
        AgentLink::start(agent_config("agent-p"), "node-p.example").unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent.wait_connected())
        .await
        .expect("agent with narrow permissions connects")
        .unwrap();
    agent.bind_shared_set("blocklist").await.unwrap();

    operator
        .publish_to_host(
            "node-p.example",
            b"for p",
            &MessageMeta::new("m-p", "desired-state"),
        )
        .await
        .unwrap();
    operator
        .publish_shared_set("blocklist", b"set", &MessageMeta::new("s-1", "set-update"))
        .await
        .unwrap();
    for expected in ["m-p", "s-1"] {
        let d = next_within(&mut to_agent, Duration::from_secs(5))
            .await
            .expect("own queue consumed");
        assert_eq!(d.message_id.as_deref(), Some(expected));
        assert_eq!(d.acker.ack().await, AckOutcome::Done);
    }
    agent
        .publish_to_operator(b"hb", &MessageMeta::new("hb-1", "heartbeat"))
        .await
        .unwrap();
    let d = next_within(&mut from_agents, Duration::from_secs(5))
        .await
        .expect("operator got it");
    assert_eq!(d.message_id.as_deref(), Some("hb-1"));
    // the operator learns who published it, as the broker checked it
    assert_eq!(d.user_id.as_deref(), Some(user.0.as_str()));
    assert_eq!(
        topology.host_of_node_user(d.user_id.as_deref().unwrap_or("")),
        Some("node-p.example")
    );
    d.acker.ack().await;

    // Consuming another host's queue with these credentials is refused.
    node_credential_reaches_no_other_queue(&user.0, &password, operator.topology()).await;

    // An agent link posing as another host never gets connected; the reason is exposed.
    let (impostor, _d) = AgentLink::start(agent_config("impostor"), "node-other").unwrap();
    eventually("the impostor's declaration refused", 10, || {
        impostor.status().failures >= 1
    })
    .await;
    let status = impostor.status();
    assert!(!status.connected);
    assert_eq!(status.connects, 0);
    let reason = status.last_error.unwrap_or_default();
    assert!(reason.contains("ACCESS"), "{reason}");
    impostor.close();

    agent.close();
    operator.close();
}

/// With a node user's credential, nothing of another host's or of the operator's can be read,
/// purged, deleted, bound or published into.
async fn node_credential_reaches_no_other_queue(user: &str, password: &str, topology: &Topology) {
    let conn = lapin::Connection::connect(
        &format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let refused = assert_refused;
    // each refusal closes its channel: one channel per attempt
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.basic_consume(
            topology.host_queue("node-other").into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming another host's queue must be refused"),
    );
    // the operator's inbox is named apart from the exchange the agent may publish to: the
    // agent can neither read, purge, delete nor bind to it
    let inbox = topology.operator_queue();
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.basic_consume(
            inbox.as_str().into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming the operator's inbox must be refused"),
    );
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.queue_purge(inbox.as_str().into(), Default::default())
            .await
            .expect_err("purging the operator's inbox must be refused"),
    );
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.queue_delete(inbox.as_str().into(), Default::default())
            .await
            .expect_err("deleting the operator's inbox must be refused"),
    );
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.queue_bind(
            inbox.as_str().into(),
            topology.hosts_exchange().as_str().into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("binding to the operator's inbox must be refused"),
    );
    // nor publish into another host's queue through the default exchange
    let ch = conn.create_channel().await.unwrap();
    refused(publish_confirmed(&ch, "", &topology.host_queue("node-other")).await);
    let _ = conn.close(200, "done".into()).await;
}

/// With the bootstrap credential, no host queue, no dog exchange, no other connection's
/// bootstrap queue (`reply` is one) and no other user-id can be used.
async fn bootstrap_credential_touches_nothing_else(
    user: &str,
    password: &str,
    topology: &Topology,
    reply: &str,
) {
    let conn = lapin::Connection::connect(
        &format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let victim = topology.host_queue("victim");
    let ch = conn.create_channel().await.unwrap();
    assert_refused(
        ch.basic_consume(
            victim.as_str().into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming a host queue"),
    );
    let ch = conn.create_channel().await.unwrap();
    assert_refused(
        ch.queue_purge(victim.as_str().into(), Default::default())
            .await
            .expect_err("purging a host queue"),
    );
    let ch = conn.create_channel().await.unwrap();
    assert_refused(
        ch.queue_delete(victim.as_str().into(), Default::default())
            .await
            .expect_err("deleting a host queue"),
    );
    let ch = conn.create_channel().await.unwrap();
    assert_refused(
        ch.queue_declare(
            topology.host_queue("newcomer").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("declaring a named queue"),
    );
    // its own generated queue cannot be bound to the hosts or sets exchange
    let ch = conn.create_channel().await.unwrap();
    let own = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for exchange in [topology.hosts_exchange(), topology.sets_exchange()] {
        let ch = conn.create_channel().await.unwrap();
        assert_refused(
            ch.queue_bind(
                own.name().clone(),
                exchange.as_str().into(),
                "victim".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect_err("binding to a dog exchange"),
        );
    }
    // publishing into a host queue (default exchange) or to the hosts exchange is refused
    let ch = conn.create_channel().await.unwrap();
    assert_refused(publish_confirmed(&ch, "", &victim).await);
    let ch = conn.create_channel().await.unwrap();
    assert_refused(publish_confirmed(&ch, &topology.hosts_exchange(), "victim").await);
    // another connection's bootstrap queue is locked to that connection
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .basic_consume(
            reply.into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming another agent's bootstrap queue")
        .to_string();
    assert!(
        e.contains("RESOURCE_LOCKED") || e.contains("RESOURCE-LOCKED"),
        "{e}"
    );
    // and the user-id the operator reads cannot be another user's
    let ch = conn.create_channel().await.unwrap();
    let e = publish_with(
        &ch,
        &topology.operator_exchange(),
        "victim",
        BasicProperties::default().with_user_id(topology.node_user("victim").as_str().into()),
    )
    .await
    .expect_err("a forged user-id")
    .to_string();
    assert!(
        e.contains("PRECONDITION_FAILED") || e.contains("PRECONDITION-FAILED"),
        "{e}"
    );
    let _ = conn.close(200, "done".into()).await;
}

/// Publishes one message on a confirm-mode channel and waits for the broker's verdict.
async fn publish_confirmed(ch: &lapin::Channel, exchange: &str, key: &str) -> lapin::Error {
    publish_with(ch, exchange, key, BasicProperties::default())
        .await
        .expect_err("the broker must refuse this publish")
}

async fn publish_with(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    properties: BasicProperties,
) -> Result<(), lapin::Error> {
    ch.confirm_select(Default::default()).await?;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"x",
            properties,
        )
        .await?;
    confirm.await.map(|_| ())
}

#[tokio::test]
async fn the_bootstrap_user_reaches_only_its_own_generated_queue() {
    init_tracing();
    let prefix = unique_prefix("boot");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("victim");
    let topology = Topology::new(prefix.clone());
    let password = format!("pw-{}", std::process::id());
    let user = add_user(
        format!("{prefix}-bootstrap"),
        &password,
        &topology.bootstrap_permissions(),
    );
    let (operator, mut from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    connected("operator", operator.wait_connected()).await;
    operator.declare_host_queue("victim").await.unwrap();

    let mut c = config(&prefix, "bootstrap");
    c.url = "amqp://127.0.0.1:5672/%2f".into();
    c.credentials = Some(Credentials {
        username: user.0.clone(),
        password: password.clone(),
    });
    let (agent, mut to_agent) = AgentLink::start_bootstrap(c, "newcomer").unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent.wait_connected())
        .await
        .expect("the bootstrap user connects")
        .unwrap();
    // sets are remembered, not bound (the bootstrap user may not bind)
    agent.bind_shared_set("blocklist").await.unwrap();
    assert_eq!(agent.shared_sets(), vec!["blocklist".to_string()]);
    let reply = agent.reply_queue().expect("a broker-named queue");
    assert!(reply.starts_with("amq.gen-"), "{reply}");

    agent
        .publish_to_operator(b"hb", &MessageMeta::new("hb-b", "heartbeat"))
        .await
        .unwrap();
    let d = next_within(&mut from_agents, Duration::from_secs(5))
        .await
        .expect("operator got the bootstrap heartbeat");
    assert_eq!(d.user_id.as_deref(), Some(user.0.as_str()));
    assert_eq!(topology.host_of_node_user(&user.0), None);
    d.acker.ack().await;

    // the operator answers through the default exchange, to that queue only
    operator
        .publish_to_queue(&reply, b"credential", &MessageMeta::new("c-1", "request"))
        .await
        .unwrap();
    let d = next_within(&mut to_agent, Duration::from_secs(5))
        .await
        .expect("the credential arrives on the bootstrap queue");
    assert_eq!(d.message_id.as_deref(), Some("c-1"));
    d.acker.ack().await;
    let err = operator
        .publish_to_queue(
            &topology.host_queue("victim"),
            b"x",
            &MessageMeta::new("c-2", "request"),
        )
        .await
        .expect_err("only broker-named queues");
    assert!(matches!(err, BrokerError::InvalidName { .. }), "{err}");

    // with the bootstrap credential, nothing of anyone else's can be touched
    bootstrap_credential_touches_nothing_else(&user.0, &password, &topology, &reply).await;

    agent.close();
    operator.close();
}
