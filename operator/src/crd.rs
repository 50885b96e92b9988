//! The custom resources of `dogfw.io/v1alpha1`: Zone, Host, Group and Profile.
//!
//! All four are cluster-scoped, have a status subresource, printer columns, short names and the
//! `dog` category (`kubectl get dog`). Everything the OpenAPI schema can express (patterns,
//! enums, ranges, required fields) is validated at admission; the compiler validates again and
//! reports per object what it refused (see `compile::Diagnostic`).
//!
//! The generated schemas must be *structural* (see `tests/crd_structural.rs`), so the types
//! avoid untagged/externally tagged enums with payloads: a rule's peer is a flat struct with a
//! `kind` discriminator instead of a `oneOf`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const API_GROUP: &str = "dogfw.io";
pub const API_VERSION: &str = "v1alpha1";

/// Regex accepted by the schema for one address entry: an IPv4 or IPv6 address, optionally
/// with a prefix length. The compiler parses every entry again with `ipnet`.
pub const ADDRESS_PATTERN: &str = concat!(
    r"^(",
    // IPv4, each octet 0-255, optional /0-32
    r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    r"(/(3[0-2]|[12]?[0-9]))?",
    r"|",
    // IPv6 in every shortened form (RFC 4291 2.2), optional /0-128
    r"(",
    r"([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,7}:",
    r"|([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}",
    r"|([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}",
    r"|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}",
    r"|[0-9a-fA-F]{1,4}:(:[0-9a-fA-F]{1,4}){1,6}",
    r"|:((:[0-9a-fA-F]{1,4}){1,7}|:)",
    r"|::([fF]{4}(:0{1,4})?:)?((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    r"|([0-9a-fA-F]{1,4}:){1,4}:((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    r")",
    r"(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?",
    r")$"
);
/// One port (`443`) or an inclusive range (`8000-8100`); numeric bounds are checked to 1..=65535
/// by the compiler (a regex cannot compare numbers cleanly).
pub const PORT_PATTERN: &str = concat!(
    r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})",
    r"(-(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$"
);
/// A Linux interface name (at most 15 characters); a trailing `+` is iptables' wildcard.
pub const INTERFACE_PATTERN: &str = r"^[a-zA-Z0-9_.-]{1,15}\+?$";
/// A Kubernetes label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters.
pub const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A Kubernetes label value: empty, or at most 63 characters starting and ending alphanumeric.
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// DNS-1123 subdomain, the shape of every Kubernetes object name we reference.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";

// ------------------------------------------------------------------------------------------
// Shared status pieces
// ------------------------------------------------------------------------------------------

/// A status condition in the usual Kubernetes shape.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `InSync`, `Drifted`, `Conflict`, `Valid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable CamelCase reason, e.g. `DanglingReference`.
    #[serde(default)]
    pub reason: String,
    /// Human-readable explanation naming the object and field concerned.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last status change of this condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A reference to a key of a ConfigMap holding one address per line (for lists too big for
/// one Zone object). `#` starts a comment; blank lines are ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapAddressSource {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub name: String,
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub namespace: String,
    /// Key inside `data`; default `addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

// ------------------------------------------------------------------------------------------
// Zone
// ------------------------------------------------------------------------------------------

/// A named list of addresses (IPv4 and IPv6 CIDRs or single IPs, mixed).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "dogfw.io",
    version = "v1alpha1",
    kind = "Zone",
    doc = "A named list of IPv4/IPv6 addresses and CIDRs usable as a peer in Profile rules.",
    plural = "zones",
    shortname = "dz",
    category = "dog",
    status = "ZoneStatus",
    printcolumn = r#"{"name":"IPv4","type":"integer","jsonPath":".status.ipv4Count"}"#,
    printcolumn = r#"{"name":"IPv6","type":"integer","jsonPath":".status.ipv6Count"}"#,
    printcolumn = r#"{"name":"Invalid","type":"integer","jsonPath":".status.invalidCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ZoneSpec {
    /// Addresses or CIDRs, IPv4 and IPv6 mixed.
    #[serde(default)]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub addresses: Vec<String>,
    /// Further addresses from ConfigMaps (one per line), for blocklists of 100k+ entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_map_refs: Vec<ConfigMapAddressSource>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneStatus {
    #[serde(default)]
    pub ipv4_count: u64,
    #[serde(default)]
    pub ipv6_count: u64,
    #[serde(default)]
    pub invalid_count: u64,
    /// The first invalid entries (at most 20), each with where it came from and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_entries: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------

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
    pub keys: Option<AgentKeys>,
    /// The Node this Host mirrors, when the operator created it from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// An agent's public keys, base64 (standard alphabet) of the raw 32-byte keys.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentKeys {
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
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Content hashes of a host's firewall: IPv4 rules, IPv6 rules and the sets it uses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirewallHashes {
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
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_keys: Option<AgentKeys>,
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
    pub expected_hashes: Option<FirewallHashes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_hashes: Option<FirewallHashes>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Group
// ------------------------------------------------------------------------------------------

/// A label selector over Host labels (the `matchLabels` / `matchExpressions` shape of
/// Kubernetes' LabelSelector).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.matchLabels) || self.matchLabels.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
        "message": "selector.matchLabels: every key must be a label key ([prefix/]name, name at most 63 characters of A-Z a-z 0-9 - _ .)"
    }
]))]
pub struct HostSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
    ))]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
        "message": "selector.matchExpressions: operators In and NotIn need at least one value"
    },
    {
        "rule": "self.operator in ['In', 'NotIn'] || !has(self.values) || size(self.values) == 0",
        "message": "selector.matchExpressions: operators Exists and DoesNotExist take no values"
    }
]))]
pub struct SelectorRequirement {
    #[schemars(regex(pattern = LABEL_KEY_PATTERN), length(max = 317))]
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = LABEL_VALUE_PATTERN), length(max = 63)))]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A set of hosts (by label selector and/or explicit names) that run one Profile. Its address
/// set can be a peer in any profile's rules.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "dogfw.io",
    version = "v1alpha1",
    kind = "Group",
    doc = "A set of hosts that run one Profile; its address set can be a peer in any rule.",
    plural = "groups",
    shortname = "dg",
    category = "dog",
    status = "GroupStatus",
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.memberCount"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.hostsRealized"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.hostsDesired"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.profile) || has(self.selector) || (has(self.hosts) && size(self.hosts) > 0) || (has(self.extraAddresses) && size(self.extraAddresses) > 0)",
        "message": "spec is empty: a Group needs at least one of profile, selector, hosts or extraAddresses"
    }
]))]
pub struct GroupSpec {
    /// The Profile every member runs. Empty: the group is only an address set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub profile: Option<String>,
    /// Hosts whose labels match are members. An absent selector selects nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<HostSelector>,
    /// Hosts named here are members regardless of labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Static extra addresses included in the group's address set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub extra_addresses: Vec<String>,
    /// Ranges within which the addresses the member hosts' agents report are believed (see
    /// the Host's `spec.trustReportedAddresses`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub trust_reported_addresses: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    #[serde(default)]
    pub member_count: u64,
    /// Member host names (at most 100 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    #[serde(default)]
    pub ipv4_addresses: u64,
    #[serde(default)]
    pub ipv6_addresses: u64,
    /// Hosts that should run the current rules of this group's profile.
    #[serde(default)]
    pub hosts_desired: u64,
    /// Of those, hosts that reported the expected hashes.
    #[serde(default)]
    pub hosts_realized: u64,
    /// Hosts where the change has not landed (at most 20 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_pending: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Profile
// ------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProfileMode {
    /// Rules are enforced.
    #[default]
    Enforce,
    /// Rules are rendered and counted; what would be dropped or rejected is logged and accepted.
    Audit,
}

/// What the node's own pods may send to the host, when the operator runs with a cluster
/// profile that names the pods' interfaces (`--cni`); Calico's `DefaultEndpointToHostAction`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum PodToHost {
    /// Accepted before the profile's rules (node-local DNS, host-network services keep working).
    #[default]
    Accept,
    /// Judged by the profile's inbound rules and default, like any other source.
    Profile,
    /// Dropped (failsafe ports stay open).
    Drop,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Accept,
    Drop,
    Reject,
    Log,
}

/// What a chain does with a packet no rule matched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DefaultAction {
    Accept,
    Drop,
    Reject,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum PeerKind {
    /// Any address (no address match).
    #[default]
    Any,
    /// The address set of the Group named in `name`.
    Group,
    /// The address set of the Zone named in `name`.
    Zone,
    /// The inline CIDRs in `cidrs`.
    Cidrs,
    /// The address set of the host's own group.
    #[serde(rename = "Self")]
    SelfGroup,
}

/// The other end of a rule: the source of inbound traffic, the destination of outbound.
///
/// Admission refuses `name` or `cidrs` on a peer of another kind: `{name: web}` without
/// `kind: Group` would otherwise default to `Any` and silently widen access.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.kind) && self.kind in ['Group', 'Zone']) || has(self.name)",
        "message": "peer.name is required when peer.kind is Group or Zone"
    },
    {
        "rule": "(has(self.kind) && self.kind in ['Group', 'Zone']) || !has(self.name)",
        "message": "peer.name is only allowed when peer.kind is Group or Zone"
    },
    {
        "rule": "!has(self.kind) || self.kind != 'Cidrs' || (has(self.cidrs) && size(self.cidrs) > 0)",
        "message": "peer.cidrs must list at least one address when peer.kind is Cidrs"
    },
    {
        "rule": "(has(self.kind) && self.kind == 'Cidrs') || !has(self.cidrs) || size(self.cidrs) == 0",
        "message": "peer.cidrs is only allowed when peer.kind is Cidrs"
    }
]))]
pub struct Peer {
    #[serde(default)]
    pub kind: PeerKind,
    /// Group or Zone name, for kinds `Group` and `Zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub name: Option<String>,
    /// For kind `Cidrs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(
        pattern = ADDRESS_PATTERN
    )))]
    pub cidrs: Vec<String>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum ConntrackState {
    New,
    Established,
    Related,
    Invalid,
    Untracked,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleType {
    #[default]
    Basic,
    /// Match when a peer has more than `connlimit.above` connections.
    Connlimit,
    /// Match when a peer sent more than `recent.hitCount` new packets in `recent.seconds`.
    Recent,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnlimitSpec {
    /// Match when the peer has more than this many connections.
    #[schemars(range(min = 1, max = 1000000))]
    pub above: u32,
    /// Prefix length grouping peers for IPv4 (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub mask_v4: Option<u8>,
    /// Prefix length grouping peers for IPv6 (default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 128))]
    pub mask_v6: Option<u8>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecentSpec {
    #[schemars(range(min = 1, max = 86400))]
    pub seconds: u32,
    /// Kernel limit of xt_recent's default `ip_pkt_list_tot` is 255.
    #[schemars(range(min = 1, max = 255))]
    pub hit_count: u32,
}

/// One rule of a Profile.
///
/// Admission (CEL) checks the combinations a schema alone cannot: ports only with tcp/udp/sctp,
/// `icmpType` only with icmp/icmpv6, `connlimit`/`recent` exactly when `type` says so.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.ports) || size(self.ports) == 0 || (has(self.protocol) && self.protocol in ['tcp', 'udp', 'sctp'])",
        "message": "ports are only allowed with protocol tcp, udp or sctp"
    },
    {
        "rule": "!has(self.ports) || self.ports.all(p, !p.contains('-') || int(p.split('-')[0]) <= int(p.split('-')[1]))",
        "message": "a port range must be written low-high (e.g. 8000-8100)"
    },
    {
        "rule": "!has(self.icmpType) || (has(self.protocol) && self.protocol in ['icmp', 'icmpv6'])",
        "message": "icmpType is only allowed with protocol icmp or icmpv6"
    },
    {
        "rule": "!has(self.type) || self.type != 'connlimit' || has(self.connlimit)",
        "message": "type connlimit needs connlimit.above"
    },
    {
        "rule": "!has(self.connlimit) || (has(self.type) && self.type == 'connlimit')",
        "message": "connlimit is only allowed with type connlimit"
    },
    {
        "rule": "!has(self.type) || self.type != 'recent' || has(self.recent)",
        "message": "type recent needs recent.seconds and recent.hitCount"
    },
    {
        "rule": "!has(self.recent) || (has(self.type) && self.type == 'recent')",
        "message": "recent is only allowed with type recent"
    }
]))]
pub struct Rule {
    /// The rule's identity in what it renders to: its comment `dog:<profile>:<in|out>:<name>`,
    /// its log prefix and its `recent` list. Without a name it is `#` and 8 hex digits of a
    /// hash of the rule, so inserting or removing another rule never renames it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.:-]{1,63}$"))]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default)]
    pub peer: Peer,
    #[serde(default)]
    pub protocol: Protocol,
    /// Ports (`443`) and inclusive ranges (`8000-8100`), for tcp, udp and sctp.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PORT_PATTERN), length(max = 11)), length(max = 64))]
    pub ports: Vec<String>,
    /// ICMP / ICMPv6 type number, for icmp and icmpv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub icmp_type: Option<u8>,
    /// Interface (inbound: `-i`, outbound: `-o`); `+` suffix is a wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_.-]{1,15}\+?$"))]
    pub interface: Option<String>,
    /// Conntrack states to match (e.g. `NEW`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<ConntrackState>,
    #[serde(default, rename = "type")]
    pub type_: RuleType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connlimit: Option<ConnlimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<RecentSpec>,
    /// Also log matching packets (a LOG rule is rendered before the rule itself).
    #[serde(default)]
    pub log: bool,
    /// Log prefix (iptables allows at most 29 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9 _.:/=-]{1,29}$"))]
    pub log_prefix: Option<String>,
    /// Free text appended to the rule's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9 _.,:/=+()-]{0,128}$"))]
    pub comment: Option<String>,
    /// Disabled rules are kept in the object but not rendered.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// Ordered inbound and outbound rules with default actions and a mode.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "dogfw.io",
    version = "v1alpha1",
    kind = "Profile",
    doc = "Ordered inbound and outbound firewall rules with default actions and a mode.",
    plural = "profiles",
    shortname = "dp",
    category = "dog",
    status = "ProfileStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Inbound","type":"integer","jsonPath":".status.inboundRules"}"#,
    printcolumn = r#"{"name":"Outbound","type":"integer","jsonPath":".status.outboundRules"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.hostsRealized"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.hostsDesired"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    #[serde(default)]
    pub mode: ProfileMode,
    /// Action for inbound packets no rule matched (the last rule of DOG-INPUT).
    #[serde(default = "default_inbound")]
    pub default_inbound: DefaultAction,
    /// Action for outbound packets no rule matched (the last rule of DOG-OUTPUT).
    #[serde(default = "default_outbound")]
    pub default_outbound: DefaultAction,
    /// What the node's own pods may send to the host (with a cluster profile; see
    /// docs/architecture.md, "The cluster profile").
    #[serde(default)]
    pub pod_to_host: PodToHost,
    #[serde(default)]
    #[schemars(length(max = 2000))]
    pub inbound: Vec<Rule>,
    #[serde(default)]
    #[schemars(length(max = 2000))]
    pub outbound: Vec<Rule>,
}

impl Default for ProfileSpec {
    fn default() -> Self {
        Self {
            mode: ProfileMode::Enforce,
            default_inbound: DefaultAction::Drop,
            default_outbound: DefaultAction::Accept,
            pod_to_host: PodToHost::Accept,
            inbound: Vec::new(),
            outbound: Vec::new(),
        }
    }
}

fn default_inbound() -> DefaultAction {
    DefaultAction::Drop
}
fn default_outbound() -> DefaultAction {
    DefaultAction::Accept
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileStatus {
    #[serde(default)]
    pub inbound_rules: u64,
    #[serde(default)]
    pub outbound_rules: u64,
    #[serde(default)]
    pub hosts_desired: u64,
    #[serde(default)]
    pub hosts_realized: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_pending: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn profile_defaults_apply_when_fields_are_omitted() {
        let p: ProfileSpec = serde_json::from_str(r#"{"inbound":[{"action":"ACCEPT"}]}"#).unwrap();
        assert_eq!(p.default_inbound, DefaultAction::Drop);
        assert_eq!(p.default_outbound, DefaultAction::Accept);
        assert!(p.inbound[0].enabled);
        assert_eq!(p.inbound[0].peer.kind, PeerKind::Any);
    }

    #[test]
    fn crds_are_cluster_scoped_with_status_and_category() {
        for crd in [Zone::crd(), Host::crd(), Group::crd(), Profile::crd()] {
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(crd.spec.group, API_GROUP);
            assert_eq!(
                crd.spec.names.categories.as_deref(),
                Some(&["dog".to_string()][..])
            );
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, API_VERSION);
            assert!(v
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some());
        }
    }
}
