//! Any sequence of changes applied one call at a time gives exactly what a full compile of the
//! same history gives: hosts' firewalls (rules and sets), every set and its hash, every
//! diagnostic and every status figure. And the changes each call reports are exactly the hosts
//! and sets whose output changed.
//!
//! "The same history" matters for one thing only: a Group or Zone that was deleted while a
//! DROP rule names it is remembered (the rule keeps blocking its last members), which a compile
//! of the final objects alone cannot know. So the reference is a second compiler that is given
//! the same inputs after every step and recompiles everything ([`Compiler::load`]); without
//! deletions of Groups and Zones the reference is also a fresh [`compile`] of the final objects.

use dog_operator::core::compile::{
    compile, CompileOptions, Compiled, Compiler, Edit, HostFacts, HostOutcome,
};
use dog_operator::crd::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const ZONES: usize = 3;
const HOSTS: usize = 6;
const GROUPS: usize = 4;
const PROFILES: usize = 3;
const MAPS: usize = 2;

fn pick<T: Clone + std::fmt::Debug + 'static>(v: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(v)
}

fn address() -> impl Strategy<Value = String> {
    pick(&[
        "10.0.0.1",
        "10.0.0.2",
        "10.0.1.0/24",
        "10.0.1.7/24",
        "192.0.2.9",
        "0.0.0.0/0",
        "2001:db8::1",
        "2001:db8:1::/48",
        "::/0",
        "not-an-address",
        "10.0.0.300",
    ])
    .prop_map(str::to_string)
}

fn addresses() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(address(), 0..5)
}

fn map_key(i: usize) -> String {
    format!("dog/blocklist-{i}/addresses")
}

fn zone() -> impl Strategy<Value = Zone> {
    (addresses(), prop::collection::vec(0..MAPS + 1, 0..2)).prop_map(|(addresses, refs)| {
        Zone::new(
            "z",
            ZoneSpec {
                addresses,
                config_map_refs: refs
                    .into_iter()
                    .map(|i| ConfigMapAddressSource {
                        namespace: "dog".into(),
                        name: format!("blocklist-{i}"),
                        key: None,
                    })
                    .collect(),
            },
        )
    })
}

fn lines() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            address(),
            Just("# a comment".to_string()),
            Just(String::new()),
            Just("203.0.113.5 # with a comment".to_string()),
        ],
        0..6,
    )
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        prop::option::of(pick(&["a", "b", "c"])),
        prop::option::of(pick(&["x", "y"])),
    )
        .prop_map(|(role, site)| {
            let mut l = BTreeMap::new();
            if let Some(r) = role {
                l.insert("role".to_string(), r.to_string());
            }
            if let Some(s) = site {
                l.insert("site".to_string(), s.to_string());
            }
            l
        })
}

fn host() -> impl Strategy<Value = Host> {
    (
        labels(),
        prop::option::of(0..GROUPS + 1),
        prop::collection::vec(
            pick(&["198.18.0.1", "198.18.0.2", "2001:db8:d06::1", "bad"]),
            0..2,
        ),
        prop::collection::vec(pick(&["198.18.0.0/24", "fd00::/64", "nope"]), 0..2),
    )
        .prop_map(|(labels, pin, addrs, trust)| {
            let mut h = Host::new(
                "h",
                HostSpec {
                    group: pin.map(|i| format!("g{i}")),
                    addresses: addrs.into_iter().map(str::to_string).collect(),
                    trust_reported_addresses: trust.into_iter().map(str::to_string).collect(),
                    ..Default::default()
                },
            );
            h.metadata.labels = Some(labels);
            h
        })
}

fn facts() -> impl Strategy<Value = HostFacts> {
    (
        pick(&[HostState::New, HostState::Active, HostState::Retired]),
        prop::collection::vec(
            pick(&[
                "198.18.0.7/24",
                "fd00::7/64",
                "203.0.113.1/24",
                "fe80::1/64",
                "127.0.0.1/8",
            ]),
            0..3,
        ),
    )
        .prop_map(|(state, addrs)| HostFacts {
            state,
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                addresses: addrs.into_iter().map(str::to_string).collect(),
            }],
        })
}

fn group() -> impl Strategy<Value = Group> {
    (
        prop::option::of(0..PROFILES + 1),
        prop::option::of(prop_oneof![
            labels().prop_map(|match_labels| HostSelector {
                match_labels,
                match_expressions: vec![],
            }),
            pick(&[
                SelectorOperator::In,
                SelectorOperator::NotIn,
                SelectorOperator::Exists
            ])
            .prop_map(|operator| HostSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![SelectorRequirement {
                    key: "role".into(),
                    operator,
                    values: if operator == SelectorOperator::Exists {
                        vec![]
                    } else {
                        vec!["a".into(), "b".into()]
                    },
                }],
            }),
        ]),
        prop::collection::vec(0..HOSTS, 0..2),
        prop::collection::vec(address(), 0..2),
        prop::collection::vec(pick(&["203.0.113.0/24", "bad"]), 0..2),
    )
        .prop_map(|(profile, selector, hosts, extra, trust)| {
            Group::new(
                "g",
                GroupSpec {
                    profile: profile.map(|i| format!("p{i}")),
                    selector,
                    hosts: hosts.into_iter().map(|i| format!("h{i}")).collect(),
                    extra_addresses: extra,
                    trust_reported_addresses: trust.into_iter().map(str::to_string).collect(),
                },
            )
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        pick(&[Action::Accept, Action::Drop, Action::Reject, Action::Log]),
        prop_oneof![
            Just((PeerKind::Any, None)),
            (0..GROUPS + 1).prop_map(|i| (PeerKind::Group, Some(format!("g{i}")))),
            (0..ZONES + 1).prop_map(|i| (PeerKind::Zone, Some(format!("z{i}")))),
            Just((PeerKind::SelfGroup, None)),
            Just((PeerKind::Cidrs, None)),
        ],
        pick(&[Protocol::Any, Protocol::Tcp, Protocol::Icmp]),
        any::<bool>(),
    )
        .prop_map(|(action, (kind, name), protocol, enabled)| Rule {
            name: None,
            action,
            peer: Peer {
                kind,
                name,
                cidrs: if kind == PeerKind::Cidrs {
                    vec!["198.51.100.0/24".into()]
                } else {
                    vec![]
                },
            },
            protocol,
            ports: if protocol == Protocol::Tcp {
                vec!["443".into()]
            } else {
                vec![]
            },
            icmp_type: None,
            interface: None,
            states: vec![],
            type_: RuleType::Basic,
            connlimit: None,
            recent: None,
            log: false,
            log_prefix: None,
            comment: None,
            enabled,
        })
}

fn profile() -> impl Strategy<Value = Profile> {
    (
        prop::collection::vec(rule(), 0..4),
        prop::collection::vec(rule(), 0..2),
    )
        .prop_map(|(inbound, outbound)| {
            Profile::new(
                "p",
                ProfileSpec {
                    inbound,
                    outbound,
                    ..Default::default()
                },
            )
        })
}

fn named<K: kube::Resource>(mut o: K, name: String) -> Option<Arc<K>> {
    o.meta_mut().name = Some(name);
    Some(Arc::new(o))
}

/// One change: a new version of an object, or its deletion (`deletes`: Groups and Zones too).
fn edit(deletes: bool) -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (0..ZONES, zone()).prop_map(|(i, z)| Edit::Zone(format!("z{i}"), named(z, format!("z{i}")))),
        1 => (0..ZONES).prop_map(|i| Edit::Zone(format!("z{i}"), None)),
        3 => (0..MAPS, lines()).prop_map(|(i, l)| Edit::ConfigMap(map_key(i), Some(Arc::new(l)))),
        1 => (0..MAPS).prop_map(|i| Edit::ConfigMap(map_key(i), None)),
        5 => (0..HOSTS, host()).prop_map(|(i, h)| Edit::Host(format!("h{i}"), named(h, format!("h{i}")))),
        1 => (0..HOSTS).prop_map(|i| Edit::Host(format!("h{i}"), None)),
        3 => (0..HOSTS, facts()).prop_map(|(i, f)| Edit::Facts(format!("h{i}"), Some(f))),
        1 => (0..HOSTS).prop_map(|i| Edit::Facts(format!("h{i}"), None)),
        4 => (0..GROUPS, group()).prop_map(|(i, g)| Edit::Group(format!("g{i}"), named(g, format!("g{i}")))),
        1 => (0..GROUPS).prop_map(|i| Edit::Group(format!("g{i}"), None)),
        4 => (0..PROFILES, profile()).prop_map(|(i, p)| Edit::Profile(format!("p{i}"), named(p, format!("p{i}")))),
        1 => (0..PROFILES).prop_map(|i| Edit::Profile(format!("p{i}"), None)),
    ]
    .prop_filter("no deleted Groups or Zones", move |e| {
        deletes || !matches!(e, Edit::Zone(_, None) | Edit::Group(_, None))
    })
}

fn steps(deletes: bool) -> impl Strategy<Value = Vec<Vec<Edit>>> {
    prop::collection::vec(prop::collection::vec(edit(deletes), 1..4), 1..25)
}

fn options() -> CompileOptions {
    CompileOptions {
        trust_reported_addresses: vec!["198.18.0.0/16".parse().unwrap()],
        ..Default::default()
    }
}

/// Hosts whose outcome differs between two compiles (a firewall compared by content).
fn changed_hosts(a: &Compiled, b: &Compiled) -> BTreeSet<String> {
    let names: BTreeSet<&String> = a.hosts.keys().chain(b.hosts.keys()).collect();
    names
        .into_iter()
        .filter(|h| {
            let fw = |o: Option<&HostOutcome>| match o {
                Some(HostOutcome::Firewall {
                    group,
                    profile,
                    firewall,
                }) => Some((group.clone(), profile.clone(), firewall.hashes.clone())),
                _ => None,
            };
            let (x, y) = (a.hosts.get(*h), b.hosts.get(*h));
            match (fw(x), fw(y)) {
                (Some(p), Some(q)) => p != q,
                (None, None) => x != y,
                _ => true,
            }
        })
        .cloned()
        .collect()
}

fn changed_sets(a: &Compiled, b: &Compiled) -> BTreeSet<String> {
    let names: BTreeSet<&String> = a.set_hashes.keys().chain(b.set_hashes.keys()).collect();
    names
        .into_iter()
        .filter(|n| a.set_hashes.get(*n) != b.set_hashes.get(*n))
        .cloned()
        .collect()
}

/// `diffs` turn the sets of `old` into those of `new`.
fn diffs_rebuild(
    diffs: &BTreeMap<String, dog_operator::core::compile::SetDiff>,
    old: &Compiled,
    new: &Compiled,
) -> Result<(), TestCaseError> {
    for (name, diff) in diffs {
        let (Some(from), Some(to)) = (old.sets.get(name), new.sets.get(name)) else {
            continue;
        };
        prop_assert_eq!(&diff.base_hash, &old.set_hashes[name]);
        prop_assert_eq!(&diff.hash, &new.set_hashes[name]);
        let gone: BTreeSet<_> = diff.remove.iter().collect();
        let mut rebuilt: Vec<_> = from
            .members
            .iter()
            .filter(|m| !gone.contains(m))
            .chain(&diff.add)
            .copied()
            .collect();
        rebuilt.sort();
        prop_assert_eq!(&rebuilt, &to.members, "{}", name);
    }
    Ok(())
}

fn run(steps: Vec<Vec<Edit>>, against_fresh: bool) -> Result<(), TestCaseError> {
    let mut inc = Compiler::new(options());
    let mut full = Compiler::new(options());
    // changes of several calls folded together, as a publish after them sees them
    let mut folded = (
        Compiled::default(),
        dog_operator::core::compile::Changes::default(),
    );
    for (i, edits) in steps.into_iter().enumerate() {
        let before = inc.compiled().clone();
        if i % 3 == 0 {
            diffs_rebuild(&folded.1.set_diffs, &folded.0, &before)?;
            folded = (before.clone(), Default::default());
        }
        let changes = inc.apply(edits.clone());
        folded.1.absorb(changes.clone());
        full.load(inc.snapshot().clone());
        let (a, b) = (inc.compiled(), full.compiled());
        prop_assert_eq!(&a.hosts, &b.hosts, "step {}: {:?}", i, edits);
        prop_assert_eq!(&a.sets, &b.sets, "step {}: {:?}", i, edits);
        prop_assert_eq!(&a.set_hashes, &b.set_hashes, "step {}", i);
        prop_assert_eq!(&a.diagnostics, &b.diagnostics, "step {}: {:?}", i, edits);
        prop_assert_eq!(&a.zones, &b.zones, "step {}", i);
        prop_assert_eq!(&a.groups, &b.groups, "step {}: {:?}", i, edits);
        prop_assert_eq!(&a.profiles, &b.profiles, "step {}: {:?}", i, edits);
        prop_assert_eq!(
            &changes.hosts,
            &changed_hosts(&before, a),
            "step {}: {:?}",
            i,
            edits
        );
        prop_assert_eq!(&changes.sets, &changed_sets(&before, a), "step {}", i);
        // a member-by-member change turns the content the hosts hold into the new one
        diffs_rebuild(&changes.set_diffs, &before, a)?;
        if against_fresh {
            let fresh: Compiled = compile(inc.snapshot(), &options());
            prop_assert_eq!(a, &fresh, "step {}: {:?}", i, edits);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn changes_one_by_one_equal_a_full_compile_of_the_same_history(steps in steps(true)) {
        run(steps, false)?;
    }

    #[test]
    fn without_deleted_groups_and_zones_they_equal_a_fresh_compile(steps in steps(false)) {
        run(steps, true)?;
    }
}
