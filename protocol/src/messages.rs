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

// ------------------------------------------------------------------------------------------
// agent → operator
// ------------------------------------------------------------------------------------------

/// Whether the agent enforces the desired state or only reports drift.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// One network interface and its addresses (with prefix length, e.g. `10.0.0.5/24`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<IpNet>,
}

/// The current drift between desired and live state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DriftSummary {
    /// Parts whose live hash differs from the applied state: `ipv4_rules`, `ipv6_rules`,
    /// `set:<name>`. Empty when in sync.
    #[serde(default)]
    pub drifted: Vec<String>,
    /// Unix seconds when the current drift was first seen.
    #[serde(default)]
    pub since: Option<u64>,
    /// Repairs made since the agent started.
    #[serde(default)]
    pub repairs: u64,
}

/// One drift observation (for the keepalive's report).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DriftEvent {
    /// Unix seconds.
    pub at: u64,
    /// `ipv4_rules`, `ipv6_rules` or `set:<name>`.
    pub part: String,
    pub expected_hash: String,
    pub found_hash: String,
    /// The agent restored the part (enforce mode).
    #[serde(default)]
    pub repaired: bool,
}

/// Sent by the agent on every (re)connect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub agent_version: String,
    pub hostname: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// The agent's Ed25519 key (must equal the key that signed the envelope).
    pub signing_key: SigningPublicKey,
    /// The agent's X25519 key that operator requests are encrypted to.
    pub encryption_key: EncryptionPublicKey,
    /// Revision of the last applied desired state, if any.
    #[serde(default)]
    pub applied_revision: Option<u64>,
    /// Hashes of the live kernel state.
    #[serde(default)]
    pub live_hashes: Option<FirewallHashes>,
    #[serde(default)]
    pub drift: DriftSummary,
    #[serde(default)]
    pub mode: Mode,
    /// Kubernetes: the agent's projected ServiceAccount token (dog's own audience), which the
    /// operator has the API server check before it pins the keys of a host it has no pin for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token: Option<String>,
    /// An agent logged in as the bootstrap user asks for its own broker user: the operator,
    /// once it has admitted the host, sends [`RequestKind::BrokerUser`] to this queue (one the
    /// broker named for the agent's connection, `amq.gen-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_reply_to: Option<String>,
}

/// Sent by the agent on an interval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// The agent's keepalive interval, so the operator knows when it is overdue.
    pub interval_secs: u64,
    #[serde(default)]
    pub applied_revision: Option<u64>,
    #[serde(default)]
    pub live_hashes: Option<FirewallHashes>,
    /// Drift observed since the previous keepalive (oldest first; the newest
    /// [`limits::DRIFT_ITEMS`] are kept). Always empty in observe mode.
    #[serde(default)]
    pub drift: Vec<DriftEvent>,
    /// Whether the agent enforces or only observes (an agent of an older release: enforce).
    #[serde(default)]
    pub mode: Mode,
    /// Observe mode: how many changes (sets to create, replace or destroy, set members to add
    /// or delete, rule lines to restore) would bring the kernel to the desired firewall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_change: Option<u64>,
}

/// Why a request failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Applying to the kernel failed (the previous state was kept or restored).
    ApplyFailed,
    /// The agent refused the content (failsafe check, foreign chain names, observe mode…).
    Refused,
    /// The revision is not newer than the applied one.
    StaleRevision,
    /// Set deltas against a base revision the agent does not hold.
    BaseMismatch,
    /// A request kind this agent does not know.
    UnknownRequest,
    /// The payload did not parse or exceeded a limit.
    Malformed,
    /// Anything else inside the agent.
    Internal,
    /// A kind a newer agent sent that this reader does not know.
    #[serde(other)]
    Other,
}

/// Response details for requests that return data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Detail {
    /// `DumpRules`: the live state as the kernel tools print it.
    Dump {
        ipv4_save: String,
        ipv6_save: String,
        ipset_save: String,
    },
    /// Free text (e.g. for `Status`).
    Text { text: String },
}

/// The single final result of a request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok {
        #[serde(default)]
        applied_revision: Option<u64>,
        #[serde(default)]
        hashes: Option<FirewallHashes>,
        /// Named durations in milliseconds (`total`, `verify`, `ipset`, `restore`, …).
        #[serde(default)]
        timings_ms: BTreeMap<String, u64>,
        #[serde(default)]
        detail: Option<Detail>,
        /// Observe mode: how many changes the plan would make (see [`Keepalive::would_change`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        would_change: Option<u64>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// The agent's answer to one request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub request_id: Uuid,
    pub result: Outcome,
}

impl Response {
    pub fn error(request_id: Uuid, kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        truncate_utf8(&mut message, limits::MESSAGE_TEXT);
        Response {
            request_id,
            result: Outcome::Error { kind, message },
        }
    }
}

/// Truncates `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Everything an agent sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Heartbeat(Heartbeat),
    Keepalive(Keepalive),
    Response(Response),
}

// ------------------------------------------------------------------------------------------
// operator → agent
// ------------------------------------------------------------------------------------------

/// Members to add to and remove from one set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetDelta {
    pub name: String,
    #[serde(default)]
    pub add: Vec<IpNet>,
    #[serde(default)]
    pub remove: Vec<IpNet>,
}

/// A change of shared set `name` to `version`, for the hosts whose copy has hash `base_hash`:
/// remove `remove`, add `add`, and the result must hash to `hash`. A host whose copy is another
/// answers `base_mismatch` and gets its full state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SetChange {
    pub name: String,
    pub version: u64,
    pub base_hash: String,
    pub hash: String,
    #[serde(default)]
    pub add: Vec<IpNet>,
    #[serde(default)]
    pub remove: Vec<IpNet>,
}

/// A secret that never reaches a log: its `Debug` prints nothing of it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// What a request asks for. Internally tagged by `kind`; unknown kinds become
/// [`RequestKind::Unknown`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestKind {
    /// Apply this full desired state. The sets named in `kept_sets` are not in
    /// `firewall.sets`: the agent holds them already (the value is the hash its copy must
    /// have) and takes them from the state it holds; a copy with another hash is answered
    /// `base_mismatch`, and the operator sends the sets in full. A rule change of a host
    /// whose sets did not change then costs the rules, not every member of every set.
    Apply {
        revision: u64,
        firewall: HostFirewall,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        kept_sets: BTreeMap<String, String>,
    },
    /// Patch the sets of the state at `base_revision`, giving `revision`.
    ApplySetDeltas {
        base_revision: u64,
        revision: u64,
        deltas: Vec<SetDelta>,
    },
    /// A set shared by many hosts, sent once (multi-recipient envelope).
    SharedSet { set: IpSet, version: u64 },
    /// A change of a shared set ([`SetChange`]), sent once to the hosts whose copy it was
    /// computed against.
    SharedSetDelta(SetChange),
    /// Report applied revision and live hashes.
    Status,
    /// Return the live rules and sets ([`Detail::Dump`]).
    DumpRules,
    /// Re-apply the last applied state.
    Reapply,
    /// The agent's own broker user (`<prefix>.node.<host>`), provisioned by the operator once
    /// the host was admitted; sent encrypted to the agent's bootstrap queue. The agent keeps
    /// it in its state directory and logs in with it from then on.
    BrokerUser {
        username: String,
        password: Password,
    },
    /// A kind this reader does not know.
    #[serde(other)]
    Unknown,
}

impl RequestKind {
    /// The revision an envelope header carries for this request (`Apply`, `ApplySetDeltas`).
    pub fn revision(&self) -> Option<u64> {
        match self {
            RequestKind::Apply { revision, .. } | RequestKind::ApplySetDeltas { revision, .. } => {
                Some(*revision)
            }
            _ => None,
        }
    }
}

/// One request to one agent (or, for `SharedSet`, to each listed agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Correlates the response. The typed sealer also uses it as the envelope message id, so
    /// an agent can answer even a payload that does not parse.
    pub id: Uuid,
    pub request: RequestKind,
}

/// Everything the operator sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OperatorMessage {
    Request(Request),
}

// ------------------------------------------------------------------------------------------
// validation
// ------------------------------------------------------------------------------------------

fn check_hashes(prefix: &str, h: &Option<FirewallHashes>) -> Result<(), LimitError> {
    if let Some(h) = h {
        for (name, v) in [
            ("ipv4_rules", &h.ipv4_rules),
            ("ipv6_rules", &h.ipv6_rules),
            ("sets", &h.sets),
        ] {
            check(|| format!("{prefix}.{name}"), v.len(), limits::SHORT_TEXT)?;
        }
    }
    Ok(())
}

fn check_set(prefix: &str, set: &IpSet) -> Result<(), LimitError> {
    check(|| format!("{prefix}.name"), set.name.len(), SET_NAME_MAX)?;
    check(
        || format!("{prefix}.members"),
        set.members.len(),
        limits::SET_MEMBERS,
    )
}

impl Heartbeat {
    pub fn validate(&self) -> Result<(), LimitError> {
        check(
            || "agent_version".into(),
            self.agent_version.len(),
            limits::AGENT_VERSION,
        )?;
        check(|| "hostname".into(), self.hostname.len(), limits::HOSTNAME)?;
        check(
            || "identity_token".into(),
            self.identity_token.as_ref().map_or(0, String::len),
            limits::IDENTITY_TOKEN,
        )?;
        // an AMQP short string; whether it is a broker-generated name the operator checks
        check(
            || "broker_reply_to".into(),
            self.broker_reply_to.as_ref().map_or(0, String::len),
            255,
        )?;
        check(
            || "interfaces".into(),
            self.interfaces.len(),
            limits::INTERFACES,
        )?;
        for (i, iface) in self.interfaces.iter().enumerate() {
            check(
                || format!("interfaces[{i}].name"),
                iface.name.len(),
                limits::INTERFACE_NAME,
            )?;
            check(
                || format!("interfaces[{i}].addresses"),
                iface.addresses.len(),
                limits::ADDRESSES_PER_INTERFACE,
            )?;
        }
        check_hashes("live_hashes", &self.live_hashes)?;
        check(
            || "drift.drifted".into(),
            self.drift.drifted.len(),
            limits::DRIFT_ITEMS,
        )?;
        for (i, d) in self.drift.drifted.iter().enumerate() {
            check(
                || format!("drift.drifted[{i}]"),
                d.len(),
                limits::SHORT_TEXT,
            )?;
        }
        Ok(())
    }
}

impl Keepalive {
    pub fn validate(&self) -> Result<(), LimitError> {
        check_hashes("live_hashes", &self.live_hashes)?;
        check(|| "drift".into(), self.drift.len(), limits::DRIFT_ITEMS)?;
        for (i, d) in self.drift.iter().enumerate() {
            for (name, v) in [
                ("part", &d.part),
                ("expected_hash", &d.expected_hash),
                ("found_hash", &d.found_hash),
            ] {
                check(|| format!("drift[{i}].{name}"), v.len(), limits::SHORT_TEXT)?;
            }
        }
        Ok(())
    }
}

impl Response {
    pub fn validate(&self) -> Result<(), LimitError> {
        match &self.result {
            Outcome::Ok {
                hashes,
                timings_ms,
                detail,
                ..
            } => {
                check_hashes("result.hashes", hashes)?;
                check(
                    || "result.timings_ms".into(),
                    timings_ms.len(),
                    limits::TIMINGS,
                )?;
                for name in timings_ms.keys() {
                    check(
                        || format!("result.timings_ms[{name:.32}]"),
                        name.len(),
                        limits::SHORT_TEXT,
                    )?;
                }
                match detail {
                    Some(Detail::Dump {
                        ipv4_save,
                        ipv6_save,
                        ipset_save,
                    }) => {
                        for (name, v) in [
                            ("ipv4_save", ipv4_save),
                            ("ipv6_save", ipv6_save),
                            ("ipset_save", ipset_save),
                        ] {
                            check(
                                || format!("result.detail.{name}"),
                                v.len(),
                                limits::DOCUMENT_TEXT,
                            )?;
                        }
                    }
                    Some(Detail::Text { text }) => check(
                        || "result.detail.text".into(),
                        text.len(),
                        limits::MESSAGE_TEXT,
                    )?,
                    None => {}
                }
                Ok(())
            }
            Outcome::Error { message, .. } => check(
                || "result.message".into(),
                message.len(),
                limits::MESSAGE_TEXT,
            ),
        }
    }
}

impl AgentMessage {
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            AgentMessage::Heartbeat(h) => h.validate(),
            AgentMessage::Keepalive(k) => k.validate(),
            AgentMessage::Response(r) => r.validate(),
        }
    }
}

impl Request {
    pub fn validate(&self) -> Result<(), LimitError> {
        match &self.request {
            RequestKind::Apply {
                firewall,
                kept_sets,
                ..
            } => {
                check(
                    || "request.firewall.host".into(),
                    firewall.host.len(),
                    limits::HOSTNAME,
                )?;
                check(
                    || "request.firewall.ipv4.text".into(),
                    firewall.ipv4.text.len(),
                    limits::DOCUMENT_TEXT,
                )?;
                check(
                    || "request.firewall.ipv6.text".into(),
                    firewall.ipv6.text.len(),
                    limits::DOCUMENT_TEXT,
                )?;
                check(
                    || "request.firewall.sets".into(),
                    firewall.sets.len(),
                    limits::SETS,
                )?;
                check(|| "request.kept_sets".into(), kept_sets.len(), limits::SETS)?;
                for name in kept_sets.keys() {
                    check(|| "request.kept_sets".into(), name.len(), SET_NAME_MAX)?;
                }
                for (name, set) in &firewall.sets {
                    let prefix = format!("request.firewall.sets[{name:.32}]");
                    check(|| prefix.clone(), name.len(), SET_NAME_MAX)?;
                    check_set(&prefix, set)?;
                }
                Ok(())
            }
            RequestKind::ApplySetDeltas { deltas, .. } => {
                check(|| "request.deltas".into(), deltas.len(), limits::DELTAS)?;
                for (i, d) in deltas.iter().enumerate() {
                    check(
                        || format!("request.deltas[{i}].name"),
                        d.name.len(),
                        SET_NAME_MAX,
                    )?;
                    check(
                        || format!("request.deltas[{i}].add"),
                        d.add.len(),
                        limits::SET_MEMBERS,
                    )?;
                    check(
                        || format!("request.deltas[{i}].remove"),
                        d.remove.len(),
                        limits::SET_MEMBERS,
                    )?;
                }
                Ok(())
            }
            RequestKind::SharedSet { set, .. } => check_set("request.set", set),
            RequestKind::SharedSetDelta(SetChange {
                name,
                base_hash,
                hash,
                add,
                remove,
                ..
            }) => {
                check(|| "request.name".into(), name.len(), SET_NAME_MAX)?;
                check(
                    || "request.base_hash".into(),
                    base_hash.len(),
                    limits::SHORT_TEXT,
                )?;
                check(|| "request.hash".into(), hash.len(), limits::SHORT_TEXT)?;
                check(|| "request.add".into(), add.len(), limits::SET_MEMBERS)?;
                check(
                    || "request.remove".into(),
                    remove.len(),
                    limits::SET_MEMBERS,
                )
            }
            RequestKind::BrokerUser { username, password } => {
                check(|| "request.username".into(), username.len(), 255)?;
                check(|| "request.password".into(), password.0.len(), 255)
            }
            RequestKind::Status
            | RequestKind::DumpRules
            | RequestKind::Reapply
            | RequestKind::Unknown => Ok(()),
        }
    }
}

impl OperatorMessage {
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            OperatorMessage::Request(r) => r.validate(),
        }
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

    #[test]
    fn validate_names_the_field() {
        let (k, _) = crate::keys::SigningKey::generate().unwrap();
        let mut hb = Heartbeat {
            agent_version: "0.1.0".into(),
            hostname: "node-1".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                addresses: vec!["10.0.0.5/24".parse().unwrap(); 65],
            }],
            signing_key: k.public(),
            encryption_key: crate::keys::EncryptionKey::generate().public(),
            applied_revision: None,
            live_hashes: None,
            drift: DriftSummary::default(),
            mode: Mode::Enforce,
            identity_token: None,
            broker_reply_to: None,
        };
        let err = hb.validate().unwrap_err();
        assert_eq!(err.field, "interfaces[0].addresses");
        assert_eq!((err.limit, err.actual), (64, 65));
        hb.interfaces[0].addresses.truncate(64);
        assert_eq!(hb.validate(), Ok(()));
        hb.hostname = "h".repeat(254);
        assert_eq!(hb.validate().unwrap_err().field, "hostname");
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
