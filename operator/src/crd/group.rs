//! Group: hosts chosen by a label selector, and the profile they run

use super::*;

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
