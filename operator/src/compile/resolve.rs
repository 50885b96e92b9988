//! Host → Group resolution: pins, explicit member lists and label selectors.

use crate::crd::{Group, Host, HostSelector, SelectorOperator};
use std::collections::BTreeMap;

/// Does `selector` select a host with `labels`? Kubernetes LabelSelector semantics; an empty
/// selector (no labels, no expressions) selects every host, an absent one (handled by the
/// caller) selects none.
pub fn selector_matches(selector: &HostSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|r| {
            let have = labels.get(&r.key);
            match r.operator {
                SelectorOperator::In => have.is_some_and(|v| r.values.contains(v)),
                SelectorOperator::NotIn => !have.is_some_and(|v| r.values.contains(v)),
                SelectorOperator::Exists => have.is_some(),
                SelectorOperator::DoesNotExist => have.is_none(),
            }
        })
}

/// Is `host` a member of `group` by its names list or selector (pins are handled by
/// [`groups_of`])?
pub fn is_member(group: &Group, host: &Host) -> bool {
    let name = host.metadata.name.as_deref().unwrap_or_default();
    if group.spec.hosts.iter().any(|h| h == name) {
        return true;
    }
    let empty = BTreeMap::new();
    let labels = host.metadata.labels.as_ref().unwrap_or(&empty);
    group
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| selector_matches(s, labels))
}

/// The groups `host` is a member of, sorted by name: only the pinned group when the host pins
/// one (an unknown pin yields no group), else every group naming or selecting it.
pub fn groups_of(host: &Host, groups: &BTreeMap<String, Group>) -> Vec<String> {
    if let Some(pin) = &host.spec.group {
        return if groups.contains_key(pin) {
            vec![pin.clone()]
        } else {
            vec![]
        };
    }
    groups
        .iter()
        .filter(|(_, g)| is_member(g, host))
        .map(|(n, _)| n.clone())
        .collect()
}

/// How a host's group memberships resolve to the firewall it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Runs `profile` as a member of `group`.
    Runs { group: String, profile: String },
    /// Member groups name different profiles.
    Conflict { groups: Vec<String> },
    /// No group, or no group with a profile.
    Unmanaged,
}

/// Resolves sorted member groups to the host's group and profile. Groups without a profile
/// are pure address sets and do not take part.
pub fn resolve(member_of: &[String], groups: &BTreeMap<String, Group>) -> Resolution {
    let with_profile: Vec<(&String, &String)> = member_of
        .iter()
        .filter_map(|g| {
            groups
                .get(g)
                .and_then(|grp| grp.spec.profile.as_ref())
                .map(|p| (g, p))
        })
        .collect();
    match with_profile.first() {
        None => Resolution::Unmanaged,
        Some((g, p)) => {
            if with_profile.iter().all(|(_, q)| q == p) {
                Resolution::Runs {
                    group: (*g).clone(),
                    profile: (*p).clone(),
                }
            } else {
                Resolution::Conflict {
                    groups: with_profile.iter().map(|(g, _)| (*g).clone()).collect(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{GroupSpec, HostSpec, SelectorRequirement};

    fn host(name: &str, labels: &[(&str, &str)], pin: Option<&str>) -> Host {
        let mut h = Host::new(
            name,
            HostSpec {
                group: pin.map(str::to_string),
                ..Default::default()
            },
        );
        h.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        h
    }

    fn group(
        name: &str,
        profile: Option<&str>,
        sel: Option<HostSelector>,
        hosts: &[&str],
    ) -> (String, Group) {
        (
            name.to_string(),
            Group::new(
                name,
                GroupSpec {
                    profile: profile.map(str::to_string),
                    selector: sel,
                    hosts: hosts.iter().map(|s| s.to_string()).collect(),
                    extra_addresses: vec![],
                    trust_reported_addresses: vec![],
                },
            ),
        )
    }

    fn labels_sel(pairs: &[(&str, &str)]) -> HostSelector {
        HostSelector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        }
    }

    #[test]
    fn selector_operators() {
        let l: BTreeMap<String, String> = [("role".to_string(), "web".to_string())].into();
        let req = |op, vals: &[&str]| HostSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![SelectorRequirement {
                key: "role".into(),
                operator: op,
                values: vals.iter().map(|s| s.to_string()).collect(),
            }],
        };
        assert!(selector_matches(
            &req(SelectorOperator::In, &["web", "db"]),
            &l
        ));
        assert!(!selector_matches(&req(SelectorOperator::In, &["db"]), &l));
        assert!(selector_matches(&req(SelectorOperator::NotIn, &["db"]), &l));
        assert!(!selector_matches(
            &req(SelectorOperator::NotIn, &["web"]),
            &l
        ));
        assert!(selector_matches(&req(SelectorOperator::Exists, &[]), &l));
        assert!(!selector_matches(
            &req(SelectorOperator::DoesNotExist, &[]),
            &l
        ));
        assert!(selector_matches(
            &req(SelectorOperator::NotIn, &["x"]),
            &BTreeMap::new()
        ));
        assert!(selector_matches(&labels_sel(&[("role", "web")]), &l));
        assert!(!selector_matches(&labels_sel(&[("role", "db")]), &l));
    }

    #[test]
    fn pins_names_selectors_and_conflicts() {
        let groups: BTreeMap<String, Group> = [
            group("a", Some("p1"), Some(labels_sel(&[("role", "web")])), &[]),
            group("b", Some("p1"), None, &["h1"]),
            group("c", Some("p2"), Some(labels_sel(&[("tier", "x")])), &[]),
            group("d", None, Some(labels_sel(&[("role", "web")])), &[]),
            group("e", Some("p3"), None, &[]),
        ]
        .into();
        let h1 = host("h1", &[("role", "web")], None);
        let m = groups_of(&h1, &groups);
        assert_eq!(m, vec!["a", "b", "d"]);
        assert_eq!(
            resolve(&m, &groups),
            Resolution::Runs {
                group: "a".into(),
                profile: "p1".into()
            }
        );
        let h2 = host("h2", &[("role", "web"), ("tier", "x")], None);
        let m = groups_of(&h2, &groups);
        assert_eq!(
            resolve(&m, &groups),
            Resolution::Conflict {
                groups: vec!["a".into(), "c".into()]
            }
        );
        let pinned = host("h2", &[("role", "web"), ("tier", "x")], Some("e"));
        assert_eq!(groups_of(&pinned, &groups), vec!["e"]);
        let bad_pin = host("h3", &[("role", "web")], Some("nope"));
        assert!(groups_of(&bad_pin, &groups).is_empty());
        let none = host("h4", &[], None);
        assert_eq!(
            resolve(&groups_of(&none, &groups), &groups),
            Resolution::Unmanaged
        );
        let only_addr = host("h5", &[("role", "web")], Some("d"));
        assert_eq!(
            resolve(&groups_of(&only_addr, &groups), &groups),
            Resolution::Unmanaged
        );
    }
}
