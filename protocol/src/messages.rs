//! The messages operator and agents exchange (docs/design.md, Transport), as JSON payloads of the envelope
//! ([`crate::envelope`]).
//!
//! * Agent → operator: [`AgentMessage`] — a [`Heartbeat`] on every (re)connect, a
//!   [`Keepalive`] on an interval, and exactly one [`Response`] per [`Request`].
//! * Operator → agent: [`OperatorMessage`] — a [`Request`] with an id and a [`RequestKind`].
//!
//! **Versioning.** The message schema version is [`SCHEMA_VERSION`]; it travels in the
//! authenticated envelope header (`schema`), not in the payload. Within one schema version,
//! fields are only ever added with a default (`#[serde(default)]`), and unknown fields are
//! ignored, so an older reader accepts a newer writer's payload. A request kind an agent does
//! not know deserializes to [`RequestKind::Unknown`] so the agent answers it with
//! [`ErrorKind::UnknownRequest`] instead of staying silent.
//!
//! **Limits.** Everything here may come from outside the process; [`validate`](Heartbeat::validate)
//! on every top-level type enforces the [`limits`] and names the offending field in a
//! [`LimitError`]. The envelope caps the payload size as a whole before it is parsed.

use crate::keys::{EncryptionPublicKey, SigningPublicKey};
use crate::ruleset::{FirewallHashes, HostFirewall, IpSet, SET_NAME_MAX};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

mod agent;
mod encoded;
mod operator;
mod validate;

pub use agent::*;
pub use encoded::{EncodeError, EncodedFirewall, EncodedSet};
pub use operator::*;

/// Schema version of the payloads defined here (carried in the envelope header).
pub const SCHEMA_VERSION: u16 = 1;

/// Size limits on fields that come from outside.
pub mod limits {
    /// Whole JSON payload (also enforced by the envelope before parsing).
    pub const MESSAGE_BYTES: usize = 64 * 1024 * 1024;
    /// A DNS name (RFC 1035).
    pub const HOSTNAME: usize = 253;
    pub const AGENT_VERSION: usize = 64;
    pub const INTERFACES: usize = 256;
    pub const INTERFACE_NAME: usize = 64;
    pub const ADDRESSES_PER_INTERFACE: usize = 64;
    /// Entries of a drift summary or report.
    pub const DRIFT_ITEMS: usize = 1024;
    /// Short free-text fields (drift part names, error messages' single lines, timing names).
    pub const SHORT_TEXT: usize = 256;
    /// Error messages and details.
    pub const MESSAGE_TEXT: usize = 64 * 1024;
    /// A rule document or a dump (iptables-save / ipset save text).
    pub const DOCUMENT_TEXT: usize = 32 * 1024 * 1024;
    /// Sets of one host firewall.
    pub const SETS: usize = 65_536;
    /// Members of one set.
    pub const SET_MEMBERS: usize = 4 * 1024 * 1024;
    /// Set deltas of one request.
    pub const DELTAS: usize = 65_536;
    /// Timing entries of one response.
    pub const TIMINGS: usize = 32;
    /// An identity token (a JWT; Kubernetes' own are around 1 KiB).
    pub const IDENTITY_TOKEN: usize = 16 * 1024;
}

/// A field that exceeds its limit. `field` is a path such as `interfaces[3].addresses`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is too large: {actual} > {limit}")]
pub struct LimitError {
    pub field: String,
    pub limit: usize,
    pub actual: usize,
}

fn check(field: impl FnOnce() -> String, actual: usize, limit: usize) -> Result<(), LimitError> {
    if actual > limit {
        Err(LimitError {
            field: field(),
            limit,
            actual,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_request_kind_parses_to_unknown_and_keeps_the_id() {
        let json = r#"{"type":"request","id":"6f1c1f2e-8a55-4e0b-9a51-6e0a1b7c9d10","request":{"kind":"reboot_the_world","force":true}}"#;
        let m: OperatorMessage = serde_json::from_str(json).unwrap();
        let OperatorMessage::Request(r) = m;
        assert_eq!(r.request, RequestKind::Unknown);
        assert_eq!(
            r.id.to_string(),
            "6f1c1f2e-8a55-4e0b-9a51-6e0a1b7c9d10".to_string()
        );
    }

    #[test]
    fn request_wire_form_is_tagged_by_kind() {
        let r = Request {
            id: Uuid::nil(),
            request: RequestKind::ApplySetDeltas {
                base_revision: 4,
                revision: 5,
                deltas: vec![SetDelta {
                    name: "dogz4-web".into(),
                    add: vec!["10.0.0.0/8".parse().unwrap()],
                    remove: vec![],
                }],
            },
        };
        let v = serde_json::to_value(OperatorMessage::Request(r.clone())).unwrap();
        assert_eq!(v["type"], "request");
        assert_eq!(v["request"]["kind"], "apply_set_deltas");
        assert_eq!(v["request"]["deltas"][0]["add"][0], "10.0.0.0/8");
        assert_eq!(r.request.revision(), Some(5));
        let status: RequestKind = serde_json::from_str(r#"{"kind":"status"}"#).unwrap();
        assert_eq!(status, RequestKind::Status);
    }

    #[test]
    fn unknown_error_kind_is_other() {
        let o: Outcome =
            serde_json::from_str(r#"{"status":"error","kind":"cosmic_ray","message":"x"}"#)
                .unwrap();
        assert_eq!(
            o,
            Outcome::Error {
                kind: ErrorKind::Other,
                message: "x".into()
            }
        );
    }

    /// A heartbeat of host node-1 with fresh keys and these interfaces.
    fn heartbeat(interfaces: Vec<Interface>) -> Heartbeat {
        let (k, _) = crate::keys::SigningKey::generate().unwrap();
        Heartbeat {
            agent_version: "0.1.0".into(),
            hostname: "node-1".into(),
            interfaces,
            signing_key: k.public(),
            encryption_key: crate::keys::EncryptionKey::generate().public(),
            applied_revision: None,
            live_hashes: None,
            drift: DriftSummary::default(),
            mode: Mode::Enforce,
            identity_token: None,
            broker_reply_to: None,
            session_envelopes: false,
        }
    }

    #[test]
    fn validate_names_the_field() {
        let mut hb = heartbeat(vec![Interface {
            name: "eth0".into(),
            addresses: vec!["10.0.0.5/24".parse().unwrap(); 65],
        }]);
        let err = hb.validate().unwrap_err();
        assert_eq!(err.field, "interfaces[0].addresses");
        assert_eq!((err.limit, err.actual), (64, 65));
        hb.interfaces[0].addresses.truncate(64);
        assert_eq!(hb.validate(), Ok(()));
        hb.hostname = "h".repeat(254);
        assert_eq!(hb.validate().unwrap_err().field, "hostname");
    }

    #[test]
    fn a_heartbeat_from_before_sessions_says_it_opens_none() {
        let mut hb = heartbeat(vec![]);
        // an older agent's heartbeat has no such field, and one that opens none sends none
        let old = serde_json::to_value(&hb).unwrap();
        assert!(old.get("session_envelopes").is_none());
        let parsed: Heartbeat = serde_json::from_value(old).unwrap();
        assert!(!parsed.session_envelopes);
        hb.session_envelopes = true;
        let new = serde_json::to_value(&hb).unwrap();
        assert_eq!(new["session_envelopes"], serde_json::json!(true));
        assert!(
            serde_json::from_value::<Heartbeat>(new)
                .unwrap()
                .session_envelopes
        );
    }

    #[test]
    fn error_response_message_is_truncated_on_a_char_boundary() {
        let r = Response::error(
            Uuid::nil(),
            ErrorKind::Internal,
            "é".repeat(limits::MESSAGE_TEXT),
        );
        assert_eq!(r.validate(), Ok(()));
    }
}
