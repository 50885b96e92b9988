//! The applier against the in-memory kernel: order of work, rollback, retry, proofs.

use super::*;
use crate::kernel::fake::FakeKernel;
use dog_protocol::ruleset::{
    parse_member, Failsafe, IpSet, RulesDocument, CHAIN_INPUT, CHAIN_OUTPUT,
};

/// A plan reads as before PerFamily: its rules under `ipv4` and `ipv6`, and back.
#[test]
fn a_plan_serializes_its_families_as_ipv4_and_ipv6() {
    let mut plan = Plan::default();
    plan.rules.v6.restore = Some("*filter\nCOMMIT\n".into());
    let json = serde_json::to_value(&plan).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["ipv4", "ipv6", "live", "sets"]);
    assert_eq!(json["ipv6"]["restore"], "*filter\nCOMMIT\n");
    let back: Plan = serde_json::from_value(json).unwrap();
    assert_eq!(back, plan);
}

fn document(family: Family, rules: &[&str]) -> RulesDocument {
    let fs = Failsafe::default();
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    chains.insert(CHAIN_INPUT.into(), fs.prologue(family, CHAIN_INPUT));
    chains.insert(CHAIN_OUTPUT.into(), fs.prologue(family, CHAIN_OUTPUT));
    for r in rules {
        let chain = r.split_whitespace().nth(1).unwrap_or_default().to_string();
        chains.entry(chain).or_default().push(r.to_string());
    }
    if let Some(out) = chains.get_mut(CHAIN_OUTPUT) {
        out.push("-A DOG-OUTPUT -j ACCEPT".into());
    }
    RulesDocument::from_chains(family, &chains)
}

fn net(s: &str) -> ipnet::IpNet {
    parse_member(s).unwrap()
}

/// A firewall whose IPv4 rules drop what set `set` holds, with `members` in it.
fn firewall(set: &str, members: &[&str], extra_rule: bool) -> HostFirewall {
    let rule = format!("-A DOG-INPUT -m set --match-set {set} src -j DROP");
    let mut v4 = vec![rule.as_str()];
    if extra_rule {
        v4.push("-A DOG-INPUT -p tcp -m tcp --dport 80 -j ACCEPT");
    }
    let s = IpSet::new(set, Family::V4, members.iter().map(|m| net(m)));
    HostFirewall {
        host: "h".into(),
        ipv4: document(Family::V4, &v4),
        ipv6: document(Family::V6, &[]),
        sets: [(set.to_string(), s)].into(),
        failsafe: Failsafe::default(),
    }
}

fn kernel() -> (Arc<FakeKernel>, Applier) {
    let fake = Arc::new(FakeKernel::default());
    let k = Applier::with_tools(fake.clone(), KernelConfig::default());
    (fake, k)
}

fn position(calls: &[String], prefix: &str) -> usize {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no call `{prefix}` in {calls:?}"))
}

#[test]
fn sets_are_written_before_the_rules_that_use_them_and_destroyed_after() {
    let (fake, k) = kernel();
    k.apply(&firewall("dogz4-a", &["10.0.0.1"], false)).unwrap();
    let calls = fake.calls();
    assert!(position(&calls, "fill dogz4-a") < position(&calls, "restore v4"));
    assert_eq!(fake.set_members("dogz4-a"), Some(vec![net("10.0.0.1")]));
    // the next firewall uses another set: rules move first, then the old set goes
    fake.clear_calls();
    k.apply(&firewall("dogz4-b", &["10.0.0.2"], false)).unwrap();
    let calls = fake.calls();
    assert!(position(&calls, "fill dogz4-b") < position(&calls, "restore v4"));
    assert!(position(&calls, "restore v4") < position(&calls, "destroy dogz4-a"));
    assert_eq!(fake.set_members("dogz4-a"), None);
}

#[test]
fn a_failed_ipv6_restore_puts_ipv4_back_and_removes_the_new_sets() {
    let (fake, k) = kernel();
    let first = firewall("dogz4-a", &["10.0.0.1"], false);
    k.apply(&first).unwrap();
    let before = fake.rules(Family::V4);
    let mut next = firewall("dogz4-b", &["10.0.0.2"], true);
    next.ipv6 = document(Family::V6, &["-A DOG-INPUT -j DROP"]);
    // it fails on the plan from the cached state and again from a fresh read
    fake.fail_next("restore v6");
    fake.fail_next("restore v6");
    let e = k.apply(&next).unwrap_err();
    assert!(e.to_string().contains("restore IPv6 rules"), "{e}");
    assert_eq!(fake.rules(Family::V4), before, "IPv4 rolled back");
    assert_eq!(fake.set_members("dogz4-b"), None, "the new set is removed");
    assert_eq!(fake.set_members("dogz4-a"), Some(vec![net("10.0.0.1")]));
    // and the next try starts from a fresh read of the kernel
    fake.clear_calls();
    k.apply(&next).unwrap();
    assert!(fake.calls()[0].starts_with("save v4"), "{:?}", fake.calls());
}

#[test]
fn a_one_member_change_is_written_and_proved_without_reading_the_set_back() {
    let (fake, k) = kernel();
    let members: Vec<String> = (0..1000)
        .map(|i| format!("10.1.{}.{}", i / 256, i % 256))
        .collect();
    let mut m: Vec<&str> = members.iter().map(String::as_str).collect();
    k.apply(&firewall("dogz4-a", &m, false)).unwrap();
    fake.clear_calls();
    m[7] = "192.0.2.7";
    let r = k.apply(&firewall("dogz4-a", &m, false)).unwrap();
    assert_eq!(
        fake.calls(),
        vec!["del dogz4-a", "add dogz4-a", "count dogz4-a"],
        "no rule restore, no read of rules or sets"
    );
    assert_eq!(r.plan.sets.delta[0].add, vec![net("192.0.2.7")]);
    assert_eq!(r.hashes, firewall("dogz4-a", &m, false).hashes());
    assert!(fake
        .set_members("dogz4-a")
        .unwrap()
        .contains(&net("192.0.2.7")));
}

#[test]
fn a_kernel_changed_behind_dogs_back_is_planned_again_from_a_fresh_read() {
    let (fake, k) = kernel();
    k.apply(&firewall("dogz4-a", &["10.0.0.1"], false)).unwrap();
    // someone adds the member the next firewall adds: the strict add fails
    fake.tamper("dogz4-a", net("10.0.0.9"), true);
    fake.clear_calls();
    let next = firewall("dogz4-a", &["10.0.0.1", "10.0.0.9"], false);
    let r = k.apply(&next).unwrap();
    let calls = fake.calls();
    assert!(
        position(&calls, "add dogz4-a") < position(&calls, "read dogz4-a"),
        "{calls:?}"
    );
    assert!(r.steps.iter().any(|s| s.step == "read"));
    assert_eq!(r.hashes, next.hashes());
}

#[test]
fn a_set_whose_count_differs_from_what_was_sent_fails_the_apply() {
    let (fake, k) = kernel();
    fake.miscount("dogz4-a");
    let e = k
        .apply(&firewall("dogz4-a", &["10.0.0.1"], false))
        .unwrap_err();
    match e {
        ApplyError::Readback { differences } => assert_eq!(
            differences,
            vec!["set dogz4-a holds 2 members, 1 were sent".to_string()]
        ),
        other => panic!("{other}"),
    }
}

#[test]
fn a_replaced_set_is_filled_under_a_temporary_name_and_swapped_in() {
    let (fake, k) = kernel();
    let old: Vec<String> = (0..200).map(|i| format!("10.0.{i}.1")).collect();
    let new: Vec<String> = (0..200).map(|i| format!("10.9.{i}.1")).collect();
    let old: Vec<&str> = old.iter().map(String::as_str).collect();
    let new: Vec<&str> = new.iter().map(String::as_str).collect();
    k.apply(&firewall("dogz4-a", &old, false)).unwrap();
    fake.clear_calls();
    let next = firewall("dogz4-a", &new, false);
    k.apply(&next).unwrap();
    let tmp = temp_name("dogz4-a");
    assert_eq!(
        fake.calls(),
        vec![
            format!("fill {tmp}"),
            format!("swap {tmp} dogz4-a"),
            format!("destroy {tmp}"),
            "count dogz4-a".to_string()
        ]
    );
    assert_eq!(fake.set_members("dogz4-a").unwrap()[0], net("10.9.0.1"));
    // drift: a hand edit is found by the full read and repaired
    fake.tamper("dogz4-a", net("10.9.0.1"), false);
    let drift = k.verify(&next).unwrap();
    assert!(!drift.is_clean());
    k.repair(&next).unwrap();
    assert!(k.verify(&next).unwrap().is_clean());
}
