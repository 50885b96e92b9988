//! Zone: named address sets

use super::*;

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
