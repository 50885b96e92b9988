//! What a publish asks the broker to keep: host-queue messages are persistent unless the
//! operator is configured for transient host messages; shared sets stay persistent either way.

mod broker_support;

use broker_support::*;
use dog_protocol::broker::{MessageMeta, OperatorLink};
use lapin::options::{BasicGetOptions, QueueBindOptions};
use lapin::types::FieldTable;

/// The `delivery_mode` of the one message waiting in `queue`.
async fn delivery_mode_of_waiting(ch: &lapin::Channel, queue: &str) -> Option<u8> {
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{queue} is empty"));
    assert_eq!(got.message_count, 0, "{queue} holds more than one message");
    *got.delivery.properties.delivery_mode()
}

#[tokio::test]
async fn host_messages_are_transient_only_when_configured() {
    init_tracing();
    let prefix = unique_prefix("dm");
    let mut cleanup = Cleanup::new(&prefix);
    cleanup.host("node-p");
    cleanup.host("node-t");

    let mut persistent = config(&prefix, "operator-default");
    persistent.quorum_queues = false;
    let mut transient = config(&prefix, "operator-transient");
    transient.quorum_queues = false;
    transient.transient_host_messages = true;
    let (default_link, _inbox_a) = OperatorLink::start(persistent).unwrap();
    connected("default operator", default_link.wait_connected()).await;
    let (transient_link, _inbox_b) = OperatorLink::start(transient).unwrap();
    connected("transient operator", transient_link.wait_connected()).await;

    let meta = MessageMeta::new("m-1", "request");
    default_link
        .publish_to_host("node-p", b"state", &meta)
        .await
        .unwrap();
    transient_link
        .publish_to_host("node-t", b"state", &meta)
        .await
        .unwrap();

    let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let topology = default_link.topology();
    assert_eq!(
        delivery_mode_of_waiting(&ch, &topology.host_queue("node-p")).await,
        Some(2),
        "by default a host message is persistent"
    );
    assert_eq!(
        delivery_mode_of_waiting(&ch, &topology.host_queue("node-t")).await,
        Some(1),
        "with transient_host_messages a host message is transient"
    );

    // a shared set from the transient operator is still persistent
    ch.queue_bind(
        topology.host_queue("node-t").as_str().into(),
        topology.sets_exchange().as_str().into(),
        "s1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    transient_link
        .publish_shared_set("s1", b"members", &MessageMeta::new("m-2", "request"))
        .await
        .unwrap();
    assert_eq!(
        delivery_mode_of_waiting(&ch, &topology.host_queue("node-t")).await,
        Some(2),
        "a shared set stays persistent"
    );
    let _ = conn.close(200, "done".into()).await;

    default_link.close();
    transient_link.close();
}
