//! A per-agent RabbitMQ user with the permissions documented in docs/broker.md can use its
//! own queue, its shared-set bindings and `dog.operator`, and is refused another host's
//! queue.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use dog_protocol::broker::{AckOutcome, AgentLink, Credentials, MessageMeta, OperatorLink};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;

struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

fn escape(name: &str) -> String {
    name.replace('.', "\\.")
}

#[tokio::test]
async fn agent_user_reaches_only_its_own_queue() {
    init_tracing();
    let prefix = unique_prefix("perm");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-p.example");
    cleanup.host("node-other");
    let user = User(format!("{prefix}-agent"));
    let password = format!("pw-{}", std::process::id());
    rabbitmqctl(&["add_user", &user.0, &password]);
    // The exact regexes of docs/broker.md, for host `node-p.example`.
    let (p, h) = (escape(&prefix), escape("node-p.example"));
    let configure = format!("^{p}\\.host\\.{h}$");
    let write = format!("^({p}\\.host\\.{h}|{p}\\.operator)$");
    let read = format!("^({p}\\.host\\.{h}|{p}\\.sets)$");
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &user.0,
        &configure,
        &write,
        &read,
    ]);

    let (operator, mut from_agents) = OperatorLink::start(config(&prefix, "operator")).unwrap();
    operator.wait_connected().await.unwrap();
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
    d.acker.ack().await;

    // Consuming another host's queue with these credentials is refused.
    let conn = lapin::Connection::connect(
        &format!("amqp://{}:{}@127.0.0.1:5672/%2f", user.0, password),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let refused = |err: lapin::Error| {
        let e = err.to_string();
        assert!(
            e.contains("ACCESS_REFUSED") || e.contains("ACCESS-REFUSED"),
            "{e}"
        );
    };
    // each refusal closes its channel: one channel per attempt
    let ch = conn.create_channel().await.unwrap();
    refused(
        ch.basic_consume(
            operator.topology().host_queue("node-other").into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("consuming another host's queue must be refused"),
    );
    // the operator's inbox is named apart from the exchange the agent may publish to: the
    // agent can neither read, purge, delete nor bind to it
    let inbox = operator.topology().operator_queue();
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
            operator.topology().hosts_exchange().as_str().into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("binding to the operator's inbox must be refused"),
    );
    let _ = conn.close(200, "done".into()).await;

    // An agent link posing as another host never gets connected; the reason is exposed.
    let (impostor, _d) = AgentLink::start(agent_config("impostor"), "node-other").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = impostor.status();
    assert!(!status.connected);
    assert_eq!(status.connects, 0);
    let reason = status.last_error.unwrap_or_default();
    assert!(reason.contains("ACCESS"), "{reason}");
    impostor.close();

    agent.close();
    operator.close();
}
