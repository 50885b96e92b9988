//! A hostile client on the broker: it holds an agent's broker credential (the test user) and
//! nothing else, and sends well-formed, correctly signed heartbeats with keys of its own, for
//! whatever host name it likes. Built on the protocol crate as documented in
//! docs/protocol.md; the operator must believe none of it.

use dog_protocol::broker::{AgentLink, BrokerConfig, MessageMeta};
use dog_protocol::envelope::Sealer;
use dog_protocol::keys::{EncryptionKey, SigningKey};
use dog_protocol::messages::{AgentMessage, DriftSummary, Heartbeat, Interface, Mode};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Attacker {
    rt: tokio::runtime::Runtime,
    link: AgentLink,
}

impl Attacker {
    /// Connects to the broker of the fleet with topology `prefix` as agent `name`.
    pub fn connect(prefix: &str, name: &str) -> Attacker {
        Self::connect_as(prefix, name, "amqp://guest:guest@127.0.0.1:5672/%2f")
    }

    /// Connects with the credential in `url` (e.g. a node user stolen from a compromised
    /// node's state directory), declaring the queue of host `name` as an agent does.
    pub fn connect_as(prefix: &str, name: &str, url: &str) -> Attacker {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut cfg = BrokerConfig::new(url, name);
        cfg.topology_prefix = prefix.to_string();
        let link = rt.block_on(async {
            let (link, _deliveries) = AgentLink::start(cfg, name).expect("attacker link");
            tokio::time::timeout(std::time::Duration::from_secs(20), link.wait_connected())
                .await
                .expect("attacker connects in time")
                .expect("attacker connects");
            link
        });
        Attacker { rt, link }
    }

    /// A heartbeat claiming to be `host`, with fresh keys, the given addresses and identity
    /// token, signed by those keys. Returns once the broker confirmed it.
    pub fn heartbeat_as(&self, host: &str, token: Option<&str>, addresses: &[&str]) {
        let (signing, _) = SigningKey::generate().expect("key");
        let sealer = Sealer::new(host, signing);
        let hb = Heartbeat {
            agent_version: "0.0.0-attacker".into(),
            hostname: host.to_string(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                addresses: addresses
                    .iter()
                    .map(|a| a.parse().expect("address"))
                    .collect(),
            }],
            signing_key: sealer.public_key(),
            encryption_key: EncryptionKey::generate().public(),
            applied_revision: None,
            live_hashes: None,
            drift: DriftSummary::default(),
            mode: Mode::Enforce,
            identity_token: token.map(str::to_string),
            broker_reply_to: None,
            session_envelopes: false,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let bytes = sealer
            .agent_message("dog-operator", &AgentMessage::Heartbeat(hb), now, 300)
            .expect("sealing a heartbeat");
        let meta = MessageMeta::new(uuid::Uuid::new_v4().to_string(), "heartbeat");
        self.rt
            .block_on(self.link.publish_to_operator(&bytes, &meta))
            .expect("publish confirmed");
    }
}

impl Attacker {
    /// `n` keepalives for `host`, validly signed with the agent key stolen from its state
    /// directory (root on a compromised node can read it). Returns once all are confirmed.
    pub fn flood_keepalives_as(&self, host: &str, state_dir: &std::path::Path, n: usize) {
        let (keys, _) = dog_protocol::keys::AgentKeys::load_or_create(state_dir).expect("keys");
        let sealer = Sealer::new(host, keys.signing);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.rt.block_on(async {
            for _ in 0..n {
                let ka = dog_protocol::messages::Keepalive {
                    interval_secs: 1,
                    applied_revision: None,
                    live_hashes: None,
                    drift: Vec::new(),
                    mode: Mode::Enforce,
                    would_change: None,
                };
                let bytes = sealer
                    .agent_message("dog-operator", &AgentMessage::Keepalive(ka), now, 300)
                    .expect("sealing");
                let meta = MessageMeta::new(uuid::Uuid::new_v4().to_string(), "keepalive");
                self.link
                    .publish_to_operator(&bytes, &meta)
                    .await
                    .expect("publish confirmed");
            }
        });
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.link.close();
    }
}

/// With the credential in `url`, tries everything that would let one node read, destroy,
/// redirect or forge another's messages, each on a fresh channel: consume, purge, delete or
/// re-declare `victim`'s queue, bind it elsewhere, bind `own`'s queue to `victim`'s routing key,
/// and publish into `victim`'s queue (default exchange) or to the hosts exchange. Returns what
/// the broker allowed.
pub fn allowed_against(url: &str, prefix: &str, own: &str, victim: &str) -> Vec<&'static str> {
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the stolen credential logs in");
        let topology = dog_protocol::broker::Topology::new(prefix);
        let (victim_q, own_q) = (topology.host_queue(victim), topology.host_queue(own));
        let (hosts, sets) = (topology.hosts_exchange(), topology.sets_exchange());
        let mut allowed = Vec::new();
        let mut attempt = |what: &'static str, ok: bool| {
            if ok {
                allowed.push(what);
            }
        };
        let ch = conn.create_channel().await.expect("channel");
        let consumed = ch
            .basic_consume(
                victim_q.as_str().into(),
                "thief".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        attempt("consume", consumed.is_ok());
        let ch = conn.create_channel().await.expect("channel");
        attempt(
            "purge",
            ch.queue_purge(victim_q.as_str().into(), Default::default())
                .await
                .is_ok(),
        );
        let ch = conn.create_channel().await.expect("channel");
        attempt(
            "delete",
            ch.queue_delete(victim_q.as_str().into(), Default::default())
                .await
                .is_ok(),
        );
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        attempt(
            "declare",
            ch.queue_declare(victim_q.as_str().into(), durable, FieldTable::default())
                .await
                .is_ok(),
        );
        for (what, queue, exchange) in [
            ("bind own queue to its routing key", &own_q, &hosts),
            ("bind its queue to the sets exchange", &victim_q, &sets),
        ] {
            let ch = conn.create_channel().await.expect("channel");
            let bound = ch
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    victim.into(),
                    Default::default(),
                    FieldTable::default(),
                )
                .await;
            attempt(what, bound.is_ok());
        }
        for (what, exchange, key) in [
            ("publish into its queue", "", victim_q.as_str()),
            ("publish to the hosts exchange", hosts.as_str(), victim),
        ] {
            let ch = conn.create_channel().await.expect("channel");
            let published = async {
                ch.confirm_select(Default::default()).await?;
                ch.basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    b"forged",
                    BasicProperties::default(),
                )
                .await?
                .await
            }
            .await;
            attempt(what, published.is_ok());
        }
        let _ = conn.close(200, "done".into()).await;
        allowed
    })
}
