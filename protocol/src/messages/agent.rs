//! Agent to operator: heartbeat, keepalive, response

use super::*;

/// Whether the agent enforces the desired state or only reports drift (the agent's `--mode`
/// and what its heartbeats report).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Apply what the operator sends.
    #[default]
    Enforce,
    /// Compute and report what would change; never touch the kernel.
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
    /// The agent opens session envelopes (mode 3, `docs/protocol.md`). An agent from before
    /// them leaves this out, and the operator encrypts each of its requests on its own (mode 1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session_envelopes: bool,
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
