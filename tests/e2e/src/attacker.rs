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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut cfg = BrokerConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", name);
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
