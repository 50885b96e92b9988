//! Publish plans: deltas, shared sets, revisions, seeding after a restart.

use super::*;
use dog_protocol::ruleset::{Failsafe, Family, HostFirewall, RulesDocument, CHAIN_INPUT};

fn fw(host: &str, rule: &str, members: &[&str]) -> Arc<CompiledFirewall> {
    let mut chains = BTreeMap::new();
    chains.insert(
        CHAIN_INPUT.to_string(),
        vec![format!("-A DOG-INPUT {rule}")],
    );
    let set = IpSet::new(
        "dogz4-a",
        Family::V4,
        members
            .iter()
            .map(|m| dog_protocol::ruleset::parse_member(m).unwrap()),
    );
    let hf = HostFirewall {
        host: host.into(),
        ipv4: RulesDocument::from_chains(Family::V4, &chains),
        ipv6: RulesDocument::from_chains(Family::V6, &BTreeMap::new()),
        sets: [(set.name.clone(), set)].into_iter().collect(),
        failsafe: Failsafe::default(),
    };
    Arc::new(CompiledFirewall::from_host_firewall(hf))
}

/// The compiler's report that every host of `c` changed.
fn all(c: &Compiled) -> Changes {
    Changes {
        hosts: c.hosts.keys().cloned().collect(),
        ..Default::default()
    }
}

fn compiled(hosts: &[(&str, Arc<CompiledFirewall>)]) -> Compiled {
    let mut c = Compiled::default();
    for (h, f) in hosts {
        for s in f.sets.values() {
            c.sets.insert(s.name.clone(), s.clone());
            c.set_hashes.insert(s.name.clone(), s.hash());
        }
        c.hosts.insert(
            h.to_string(),
            HostOutcome::Firewall {
                group: "g".into(),
                profile: "p".into(),
                firewall: f.clone(),
            },
        );
    }
    c
}

#[test]
fn first_plan_applies_every_reachable_host_and_nothing_when_unchanged() {
    let mut st = PublishState::default();
    let c = compiled(&[
        ("a", fw("a", "-j DROP", &["1.1.1.1"])),
        ("b", fw("b", "-j DROP", &["1.1.1.1"])),
    ]);
    let out = plan(&mut st, &c, &all(&c), &|h| h != "b", 1000);
    assert_eq!(out.len(), 1);
    assert!(matches!(&out[0], Publish::Apply { host, revision: 1000, .. } if host == "a"));
    assert!(plan(&mut st, &c, &all(&c), &|h| h != "b", 2000).is_empty());
}

#[test]
fn a_set_change_is_one_shared_publish_and_a_rule_change_is_a_new_revision() {
    let mut st = PublishState::default();
    let c1 = compiled(&[
        ("a", fw("a", "-j DROP", &["1.1.1.1"])),
        ("b", fw("b", "-j DROP", &["1.1.1.1"])),
    ]);
    plan(&mut st, &c1, &all(&c1), &|_| true, 1000);
    let c2 = compiled(&[
        ("a", fw("a", "-j DROP", &["2.2.2.2"])),
        ("b", fw("b", "-j DROP", &["2.2.2.2"])),
    ]);
    let out = plan(&mut st, &c2, &all(&c2), &|_| true, 1000);
    assert_eq!(out.len(), 1);
    match &out[0] {
        Publish::SharedSet {
            set,
            version,
            recipients,
            change,
        } => {
            assert_eq!(set.name, "dogz4-a");
            assert_eq!(*version, 1000);
            assert_eq!(recipients, &vec!["a".to_string(), "b".to_string()]);
            // replacing the only member: the full set is no larger than the change
            assert_eq!(change, &None);
        }
        other => panic!("unexpected {other:?}"),
    }
    let c3 = compiled(&[
        ("a", fw("a", "-j ACCEPT", &["2.2.2.2"])),
        ("b", fw("b", "-j DROP", &["2.2.2.2"])),
    ]);
    let out = plan(&mut st, &c3, &all(&c3), &|_| true, 500);
    assert!(matches!(&out[..], [Publish::Apply { host, revision: 1001, .. }] if host == "a"));
}

fn members(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_small_change_of_a_large_set_goes_as_a_change_to_the_hosts_that_hold_the_base() {
    let mut st = PublishState::default();
    let ten = members(10);
    let mut changed = ten.clone();
    changed[3] = "10.0.1.1".into();
    let nine: Vec<String> = ten[..9].to_vec();
    // b misses the second plan, so its copy is older than that plan's base
    let c0 = compiled(&[
        ("a", fw("a", "-j DROP", &refs(&nine))),
        ("b", fw("b", "-j DROP", &refs(&nine))),
    ]);
    plan(&mut st, &c0, &all(&c0), &|_| true, 1000);
    let c1 = compiled(&[
        ("a", fw("a", "-j DROP", &refs(&ten))),
        ("b", fw("b", "-j DROP", &refs(&ten))),
    ]);
    plan(&mut st, &c1, &all(&c1), &|h| h == "a", 1001);
    let c2 = compiled(&[
        ("a", fw("a", "-j DROP", &refs(&changed))),
        ("b", fw("b", "-j DROP", &refs(&changed))),
    ]);
    let out = plan(&mut st, &c2, &all(&c2), &|_| true, 1002);
    let [Publish::SharedSet {
        recipients: to_change,
        change: Some(change),
        version: v1,
        ..
    }, Publish::SharedSet {
        recipients: to_full,
        change: None,
        version: v2,
        set,
    }] = &out[..]
    else {
        panic!("expected a change and a full set: {out:?}")
    };
    assert_eq!(to_change, &vec!["a".to_string()]);
    assert_eq!(to_full, &vec!["b".to_string()]);
    assert_eq!(v1, v2);
    let net = |s: &str| dog_protocol::ruleset::parse_member(s).unwrap();
    assert_eq!(change.add, vec![net("10.0.1.1")]);
    assert_eq!(change.remove, vec![net("10.0.0.4")]);
    assert_eq!(change.base_hash, c1.sets["dogz4-a"].hash());
    assert_eq!(set.hash(), c2.sets["dogz4-a"].hash());
}

proptest::proptest! {
    /// The change from one set to another rebuilds the other exactly.
    #[test]
    fn a_change_rebuilds_the_new_set(
        old in proptest::collection::btree_set(0u16..400, 0..60),
        new in proptest::collection::btree_set(0u16..400, 0..60),
    ) {
        let set = |v: &std::collections::BTreeSet<u16>| IpSet::new(
            "dogz4-p",
            Family::V4,
            v.iter().map(|i| dog_protocol::ruleset::parse_member(&format!("10.0.{}.{}", i / 256, i % 256)).unwrap()),
        );
        let (old, new) = (set(&old), set(&new));
        let c = set_change(&old, &new, 1);
        let removed: BTreeSet<_> = c.remove.iter().collect();
        let rebuilt = IpSet::new(
            "dogz4-p",
            Family::V4,
            old.members.iter().filter(|m| !removed.contains(m)).chain(&c.add).copied(),
        );
        proptest::prop_assert_eq!(&rebuilt.members, &new.members);
        proptest::prop_assert_eq!(c.base_hash, old.hash());
        // nothing both added and removed, nothing added that was there
        proptest::prop_assert!(c.add.iter().all(|m| !old.members.contains(m)));
        proptest::prop_assert!(c.remove.iter().all(|m| !new.members.contains(m)));
    }
}

#[test]
fn only_reported_forgotten_and_waiting_hosts_are_looked_at() {
    let mut st = PublishState::default();
    let c1 = compiled(&[
        ("a", fw("a", "-j DROP", &["1.1.1.1"])),
        ("b", fw("b", "-j DROP", &["1.1.1.1"])),
        ("c", fw("c", "-j DROP", &["1.1.1.1"])),
    ]);
    // the first plan looks at every host; c cannot be sent to yet
    let out = plan(&mut st, &c1, &Changes::default(), &|h| h != "c", 1000);
    assert_eq!(out.len(), 2);
    // a new rule for everyone, but the compiler reports only a: b is not looked at
    let c2 = compiled(&[
        ("a", fw("a", "-j ACCEPT", &["1.1.1.1"])),
        ("b", fw("b", "-j ACCEPT", &["1.1.1.1"])),
        ("c", fw("c", "-j ACCEPT", &["1.1.1.1"])),
    ]);
    let only_a = Changes {
        hosts: ["a".to_string()].into(),
        ..Default::default()
    };
    let out = plan(&mut st, &c2, &only_a, &|_| true, 2000);
    let hosts: Vec<&str> = out
        .iter()
        .filter_map(|p| match p {
            Publish::Apply { host, .. } => Some(host.as_str()),
            _ => None,
        })
        .collect();
    // c waited for its keys and is sent now; b is forgotten next and then sent
    assert_eq!(hosts, vec!["a", "c"]);
    st.forget("b");
    let out = plan(&mut st, &c2, &Changes::default(), &|_| true, 3000);
    assert!(matches!(&out[..], [Publish::Apply { host, .. }] if host == "b"));
    assert!(plan(&mut st, &c2, &Changes::default(), &|_| true, 4000).is_empty());
}

#[test]
fn the_compilers_member_change_is_sent_without_comparing_the_sets() {
    let mut st = PublishState::default();
    let ten = members(10);
    let c1 = compiled(&[("a", fw("a", "-j DROP", &refs(&ten)))]);
    plan(&mut st, &c1, &all(&c1), &|_| true, 1000);
    let mut more = ten.clone();
    more.push("10.0.9.9".into());
    let c2 = compiled(&[("a", fw("a", "-j DROP", &refs(&more)))]);
    let net = |s: &str| dog_protocol::ruleset::parse_member(s).unwrap();
    let mut changes = all(&c2);
    changes.sets.insert("dogz4-a".into());
    changes.set_diffs.insert(
        "dogz4-a".into(),
        crate::core::compile::SetDiff {
            base_hash: c1.set_hashes["dogz4-a"].clone(),
            hash: c2.set_hashes["dogz4-a"].clone(),
            add: vec![net("10.0.9.9")],
            remove: vec![],
        },
    );
    let out = plan(&mut st, &c2, &changes, &|_| true, 2000);
    let [Publish::SharedSet {
        change: Some(c), ..
    }] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(c.add, vec![net("10.0.9.9")]);
    assert_eq!(c.hash, c2.set_hashes["dogz4-a"]);
    // the same as the merge of the two sets gives
    let merged = set_change(&c1.sets["dogz4-a"], &c2.sets["dogz4-a"], c.version);
    assert_eq!(c, &merged);
}

#[test]
fn a_rule_change_names_the_sets_a_host_holds_instead_of_sending_them() {
    let mut st = PublishState::default();
    let c1 = compiled(&[("a", fw("a", "-j DROP", &["1.1.1.1"]))]);
    let out = plan(&mut st, &c1, &all(&c1), &|_| true, 1000);
    // the first state is sent whole
    assert!(matches!(&out[..], [Publish::Apply { kept, .. }] if kept.is_empty()));
    let c2 = compiled(&[("a", fw("a", "-j ACCEPT", &["1.1.1.1"]))]);
    let out = plan(&mut st, &c2, &all(&c2), &|_| true, 2000);
    let [Publish::Apply {
        kept,
        firewall,
        host,
        ..
    }] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        kept,
        &BTreeMap::from([("dogz4-a".to_string(), c2.set_hashes["dogz4-a"].clone())])
    );
    assert!(firewall
        .to_host_firewall_without(host, kept)
        .sets
        .is_empty());
    // a forgotten host gets everything again
    st.forget("a");
    let c3 = compiled(&[("a", fw("a", "-j REJECT", &["1.1.1.1"]))]);
    let out = plan(&mut st, &c3, &all(&c3), &|_| true, 3000);
    assert!(matches!(&out[..], [Publish::Apply { kept, .. }] if kept.is_empty()));
}

#[test]
fn seeded_state_publishes_nothing_and_forget_resends() {
    let f = fw("a", "-j DROP", &["1.1.1.1"]);
    let c = compiled(&[("a", f.clone())]);
    let mut st = PublishState::default();
    st.seed("a", 77, &f, &c);
    assert!(plan(&mut st, &c, &all(&c), &|_| true, 10).is_empty());
    st.forget("a");
    let out = plan(&mut st, &c, &all(&c), &|_| true, 10);
    assert!(matches!(&out[..], [Publish::Apply { revision: 10, .. }]));
}
