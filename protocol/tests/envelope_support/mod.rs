//! Shared fixtures of the envelope tests.
#![allow(dead_code)]

use dog_protocol::envelope::{Opener, Sealer};
use dog_protocol::keys::pinning::Pins;
use dog_protocol::keys::{EncryptionKey, SigningKey, TrustedKeys};
use dog_protocol::messages::*;
use dog_protocol::ruleset::{Failsafe, Family, HostFirewall, IpSet, RulesDocument};
use std::collections::BTreeMap;
use uuid::Uuid;

pub const OPERATOR: &str = "dog-operator";
pub const NOW: u64 = 1_750_000_000;
pub const TTL: u64 = 300;

pub struct Agent {
    pub name: String,
    pub signing: SigningKey,
    pub pkcs8: Vec<u8>,
    pub encryption: EncryptionKey,
}

impl Agent {
    /// A sealer signing as `identity` with this agent's key.
    pub fn sealer_as(&self, identity: &str) -> Sealer {
        Sealer::new(identity, SigningKey::from_pkcs8(&self.pkcs8).unwrap())
    }
    pub fn sealer(&self) -> Sealer {
        self.sealer_as(&self.name)
    }
}

pub fn agent(name: &str) -> Agent {
    let (signing, pkcs8) = SigningKey::generate().unwrap();
    Agent {
        name: name.to_string(),
        signing,
        pkcs8: pkcs8.to_vec(),
        encryption: EncryptionKey::generate(),
    }
}

pub fn operator_key() -> SigningKey {
    SigningKey::generate().unwrap().0
}

/// An operator sealer and an agent opener that trusts it.
pub fn operator_and_agent(name: &str) -> (Sealer, Opener, Agent) {
    let op = operator_key();
    let a = agent(name);
    let opener = Opener::for_agent(
        name,
        a.encryption.clone(),
        OPERATOR,
        TrustedKeys::new([op.public()]),
    );
    (Sealer::new(OPERATOR, op), opener, a)
}

pub fn operator_opener(tofu: bool) -> Opener {
    Opener::for_operator(OPERATOR, Pins::new(tofu))
}

pub fn firewall(host: &str) -> HostFirewall {
    let fs = Failsafe::default();
    let mut sets = BTreeMap::new();
    let set = IpSet::new(
        "dogz4-web",
        Family::V4,
        [
            "10.1.0.0/16".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ],
    );
    sets.insert(set.name.clone(), set);
    let doc = |family| {
        let mut chains = BTreeMap::new();
        chains.insert("DOG-INPUT".to_string(), fs.prologue(family, "DOG-INPUT"));
        chains.insert("DOG-OUTPUT".to_string(), fs.prologue(family, "DOG-OUTPUT"));
        RulesDocument::from_chains(family, &chains)
    };
    HostFirewall {
        host: host.to_string(),
        ipv4: doc(Family::V4),
        ipv6: doc(Family::V6),
        sets,
        failsafe: fs,
    }
}

pub fn apply(host: &str, revision: u64) -> Request {
    Request {
        id: Uuid::new_v4(),
        request: RequestKind::Apply {
            revision,
            firewall: firewall(host),
            kept_sets: Default::default(),
        },
    }
}

pub fn heartbeat(a: &Agent) -> AgentMessage {
    AgentMessage::Heartbeat(Heartbeat {
        agent_version: "0.1.0".into(),
        hostname: a.name.clone(),
        interfaces: vec![Interface {
            name: "eth0".into(),
            addresses: vec![
                "10.0.0.5/24".parse().unwrap(),
                "fd00::5/64".parse().unwrap(),
            ],
        }],
        signing_key: a.signing.public(),
        encryption_key: a.encryption.public(),
        applied_revision: Some(3),
        live_hashes: Some(firewall(&a.name).hashes()),
        drift: DriftSummary::default(),
        mode: Mode::Enforce,
        identity_token: None,
        broker_reply_to: None,
        session_envelopes: false,
    })
}

/// What a rejected message must leave unchanged.
pub fn state(o: &Opener) -> (usize, Option<u64>) {
    (o.replay_cache().len(), o.applied_revision())
}

/// Builds an envelope by hand (to test what the sealer refuses to produce).
pub fn raw(
    key: &SigningKey,
    mode: u8,
    header: &serde_json::Value,
    keys: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = b"DOGE".to_vec();
    out.push(1);
    out.push(mode);
    out.extend_from_slice(&key.public().0);
    let h = serde_json::to_vec(header).unwrap();
    for section in [&h[..], keys, payload] {
        out.extend_from_slice(&(section.len() as u32).to_be_bytes());
        out.extend_from_slice(section);
    }
    let sig = key.sign(&out);
    out.extend_from_slice(&sig);
    out
}

/// A valid header for `raw`, from `sender` (signed with `key`) to `to`.
pub fn header_json(key: &SigningKey, kind: &str, sender: &str, to: &str) -> serde_json::Value {
    serde_json::json!({
        "schema": 1,
        "kind": kind,
        "sender": sender,
        "recipients": [to],
        "id": Uuid::new_v4(),
        "revision": null,
        "issued_at": NOW,
        "expires_at": NOW + TTL,
        "key_id": key.key_id(),
    })
}
