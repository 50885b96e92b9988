//! Profile: the rules a group's hosts run

use super::*;

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

pub(super) fn default_true() -> bool {
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

pub(super) fn default_inbound() -> DefaultAction {
    DefaultAction::Drop
}
pub(super) fn default_outbound() -> DefaultAction {
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
