//! Host → Group resolution: pins, explicit member lists and label selectors.

use crate::crd::{Group, Host, HostSelector, SelectorOperator, SelectorRequirement};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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

/// The groups by name, as the compiler holds them.
pub type Groups = BTreeMap<String, Arc<Group>>;

/// Is `host` in `group` (named `name`) as [`groups_of`] decides: a host that pins a group is in
/// that group only; otherwise by the group's names list or selector.
pub fn is_member_of(name: &str, group: &Group, host: &Host) -> bool {
    match &host.spec.group {
        Some(pin) => pin == name,
        None => is_member(group, host),
    }
}

/// The groups `host` is a member of, sorted by name: only the pinned group when the host pins
/// one (an unknown pin yields no group), else every group naming or selecting it.
pub fn groups_of(host: &Host, groups: &Groups) -> Vec<String> {
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

/// The groups that could contain a host, indexed once per change of the groups: resolving a
/// host then costs its labels plus its candidate groups, not every group (20,000 hosts × 2,000
/// groups was 40 million selector checks). A group is filed under one thing every member must
/// have: a name it lists, one `matchLabels` pair, the pairs of one `In` expression, or one
/// `Exists` key; a selector with none of those (empty, or only `NotIn`/`DoesNotExist`) is a
/// candidate for every host. Candidates are then checked with [`is_member`], so the answer is
/// exactly [`groups_of`]'s.
#[derive(Debug, Default)]
pub struct GroupIndex {
    by_host: HashMap<String, Vec<String>>,
    by_label: HashMap<(String, String), Vec<String>>,
    by_key: HashMap<String, Vec<String>>,
    everyone: Vec<String>,
}

impl GroupIndex {
    pub fn new(groups: &Groups) -> Self {
        let mut ix = GroupIndex::default();
        for (name, g) in groups {
            for h in &g.spec.hosts {
                ix.by_host.entry(h.clone()).or_default().push(name.clone());
            }
            let Some(sel) = &g.spec.selector else {
                continue;
            };
            let is = |op| move |r: &&SelectorRequirement| r.operator == op;
            if let Some((k, v)) = sel.match_labels.iter().next() {
                ix.by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(name.clone());
            } else if let Some(r) = sel.match_expressions.iter().find(is(SelectorOperator::In)) {
                // `In` with no values selects nothing: filed nowhere
                for v in &r.values {
                    ix.by_label
                        .entry((r.key.clone(), v.clone()))
                        .or_default()
                        .push(name.clone());
                }
            } else if let Some(r) = sel
                .match_expressions
                .iter()
                .find(is(SelectorOperator::Exists))
            {
                ix.by_key
                    .entry(r.key.clone())
                    .or_default()
                    .push(name.clone());
            } else {
                ix.everyone.push(name.clone());
            }
        }
        ix
    }

    /// [`groups_of`], from the index (`groups` is what it was built from).
    pub fn groups_of(&self, host: &Host, groups: &Groups) -> Vec<String> {
        if host.spec.group.is_some() {
            return groups_of(host, groups);
        }
        let mut candidates: Vec<&str> = self.everyone.iter().map(String::as_str).collect();
        let name = host.metadata.name.as_deref().unwrap_or_default();
        candidates.extend(
            self.by_host
                .get(name)
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        for (k, v) in host.metadata.labels.iter().flatten() {
            // the map is keyed by owned pairs; a lookup clones the two short strings
            let pair = (k.clone(), v.clone());
            candidates.extend(
                self.by_label
                    .get(&pair)
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
            candidates.extend(self.by_key.get(k).into_iter().flatten().map(String::as_str));
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .filter(|g| groups.get(*g).is_some_and(|g| is_member(g, host)))
            .map(str::to_string)
            .collect()
    }
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
pub fn resolve(member_of: &[String], groups: &Groups) -> Resolution {
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
mod index_tests {
    use super::*;
    use crate::crd::{GroupSpec, HostSpec, SelectorRequirement};
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_string)
    }
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![Just("role"), Just("site"), Just("tier")].prop_map(str::to_string)
    }
    fn operator() -> impl Strategy<Value = SelectorOperator> {
        prop_oneof![
            Just(SelectorOperator::In),
            Just(SelectorOperator::NotIn),
            Just(SelectorOperator::Exists),
            Just(SelectorOperator::DoesNotExist),
        ]
    }
    fn selector() -> impl Strategy<Value = Option<HostSelector>> {
        let req = (key(), operator(), prop::collection::vec(value(), 0..3)).prop_map(
            |(key, operator, values)| SelectorRequirement {
                key,
                operator,
                values,
            },
        );
        prop::option::of(
            (
                prop::collection::btree_map(key(), value(), 0..3),
                prop::collection::vec(req, 0..3),
            )
                .prop_map(|(match_labels, match_expressions)| HostSelector {
                    match_labels,
                    match_expressions,
                }),
        )
    }
    fn host_name() -> impl Strategy<Value = String> {
        (0u8..6).prop_map(|i| format!("h{i}"))
    }

    proptest! {
        /// The index answers exactly what checking every group answers.
        #[test]
        fn the_index_agrees_with_checking_every_group(
            groups in prop::collection::vec((selector(), prop::collection::vec(host_name(), 0..3)), 0..12),
            hosts in prop::collection::vec((host_name(), prop::collection::btree_map(key(), value(), 0..3), prop::option::of(0usize..14)), 1..8),
        ) {
            let groups: Groups = groups
                .into_iter()
                .enumerate()
                .map(|(i, (selector, hosts))| {
                    let name = format!("g{i:02}");
                    let spec = GroupSpec { selector, hosts, ..Default::default() };
                    (name.clone(), Arc::new(Group::new(&name, spec)))
                })
                .collect();
            let index = GroupIndex::new(&groups);
            for (name, labels, pin) in hosts {
                let spec = HostSpec { group: pin.map(|i| format!("g{i:02}")), ..Default::default() };
                let mut h = Host::new(&name, spec);
                h.metadata.labels = Some(labels);
                let want = groups_of(&h, &groups);
                prop_assert_eq!(index.groups_of(&h, &groups), want.clone(), "{:?}", h);
                for (g, group) in &groups {
                    prop_assert_eq!(is_member_of(g, group, &h), want.contains(g));
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
    ) -> (String, Arc<Group>) {
        (
            name.to_string(),
            Arc::new(Group::new(
                name,
                GroupSpec {
                    profile: profile.map(str::to_string),
                    selector: sel,
                    hosts: hosts.iter().map(|s| s.to_string()).collect(),
                    extra_addresses: vec![],
                    trust_reported_addresses: vec![],
                },
            )),
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
        let groups: Groups = [
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
