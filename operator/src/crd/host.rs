//! Host: one machine dog manages, its agent's keys and its reported state

use super::*;

/// One managed server: a Kubernetes Node (created by the operator) or a VM whose agent
/// registered itself. The Host's labels (copied from the Node) are what Group selectors match.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "dogfw.io",
    version = "v1alpha1",
    kind = "Host",
    doc = "One managed server (a Kubernetes Node or a VM running dog-agent) and its firewall state.",
    plural = "hosts",
    shortname = "dh",
    category = "dog",
    status = "HostStatus",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".status.group"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.appliedRevision"}"#,
    printcolumn = r#"{"name":"InSync","type":"string","jsonPath":".status.conditions[?(@.type==\"InSync\")].status"}"#,
    printcolumn = r#"{"name":"Keepalive","type":"date","jsonPath":".status.lastKeepalive"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HostSpec {
    /// Pin this host to a Group by name, overriding label selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub group: Option<String>,
    /// Addresses known from outside the agent (for a Node: its InternalIP/ExternalIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub addresses: Vec<String>,
    /// Ranges within which the addresses the agent reports (`status.interfaces`) are believed.
    /// A reported address outside these, its Groups' and the operator's
    /// (`--trust-reported-addresses`) is not used, and the Host says so (`Degraded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub trust_reported_addresses: Vec<String>,
    /// Keys pinned by an administrator (`dog-agent --print-keys` prints them): the host's pin;
    /// an agent with other keys is refused. When absent, the operator pins the keys of an agent
    /// it admitted (its ServiceAccount token, or trust on first use) into `status.pinnedKeys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<AgentPublicKeys>,
    /// The Node this Host mirrors, when the operator created it from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// An agent's public keys, base64 (standard alphabet) of the raw 32-byte keys.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPublicKeys {
    /// Ed25519 public key used to verify the agent's messages.
    #[schemars(regex(pattern = r"^[A-Za-z0-9+/]{43}=$"))]
    pub signing: String,
    /// X25519 public key the operator encrypts to (HPKE).
    #[schemars(regex(pattern = r"^[A-Za-z0-9+/]{43}=$"))]
    pub encryption: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HostState {
    #[default]
    New,
    Active,
    Inactive,
    Retired,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Content hashes of a host's firewall: IPv4 rules, IPv6 rules and the sets it uses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashesStatus {
    #[serde(default)]
    pub ipv4_rules: String,
    #[serde(default)]
    pub ipv6_rules: String,
    #[serde(default)]
    pub sets: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    #[serde(default)]
    pub state: HostState,
    /// The Group this host resolved to (empty when none or in conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_keys: Option<AgentPublicKeys>,
    /// SHA-256 fingerprint (hex, first 16 bytes) of the pinned signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_keepalive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<u64>,
    /// Observe mode: how many changes (sets, set members, rule lines) would bring the host to
    /// the desired rules; the agent applies none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_change: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_hashes: Option<HashesStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_hashes: Option<HashesStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
