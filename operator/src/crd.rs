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

mod group;
mod host;
mod profile;
mod zone;

pub use group::*;
pub use host::*;
pub use profile::*;
pub use zone::*;

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
