//! What one agent says about itself cannot change another host's firewall beyond what an
//! administrator allowed. Whatever interfaces a (compromised) agent reports for its host —
//! foreign addresses, whole networks, other hosts' addresses, garbage — every other host's
//! rules stay byte for byte the same, and its sets gain or lose only addresses inside the
//! CIDRs the reporting host is trusted with (`spec.trustReportedAddresses`). Without such
//! trust nothing of any other host changes at all.
//!
//! An agent's only inputs to the compiler are the interfaces its heartbeats report (keys,
//! revision and hashes concern its own host; its liveness is the lifecycle's, tested there),
//! so a sequence of messages reduces to the last interfaces it reported: that is what is
//! generated here.

use dog_operator::core::compile::{compile, CompileOptions, Compiled, HostOutcome, Snapshot};
use dog_operator::crd::InterfaceStatus;
use dog_operator::dir::load::load_dir;
use dog_protocol::ruleset::Family;
use ipnet::IpNet;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

const REPORTER: &str = "web-1";

fn fleet() -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    let (snap, errors) = load_dir(&dir).expect("examples/fleet loads");
    assert!(errors.is_empty(), "{errors:?}");
    snap
}

/// Every other host's rules per family and set members per set name.
type View = Vec<(String, String, String, Vec<(String, BTreeSet<IpNet>)>)>;

fn others(c: &Compiled) -> View {
    c.hosts
        .iter()
        .filter(|(name, _)| name.as_str() != REPORTER)
        .map(|(name, outcome)| match outcome {
            HostOutcome::Firewall { firewall, .. } => (
                name.clone(),
                firewall.document(Family::V4).text.clone(),
                firewall.document(Family::V6).text.clone(),
                firewall
                    .sets
                    .iter()
                    .map(|(s, set)| (s.clone(), set.members.iter().copied().collect()))
                    .collect(),
            ),
            other => (name.clone(), format!("{other:?}"), String::new(), vec![]),
        })
        .collect()
}

fn with_report(mut snap: Snapshot, interfaces: Vec<InterfaceStatus>, trusted: bool) -> Snapshot {
    let host = std::sync::Arc::make_mut(snap.hosts.get_mut(REPORTER).expect("the reporting host"));
    if !trusted {
        host.spec.trust_reported_addresses.clear();
    }
    snap.facts
        .entry(REPORTER.to_string())
        .or_default()
        .interfaces = interfaces;
    snap
}

/// Addresses an agent might claim: its own network, other hosts', foreign ones, whole
/// networks, link-local, loopback, and text that is no address at all.
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u16..=0xffff, 48u8..=128).prop_map(|(x, p)| format!("fd00:d06::{x:x}/{p}")),
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(a))),
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
        (1u8..=60).prop_map(|i| format!("198.18.{}.{i}/24", i % 4)),
        Just("0.0.0.0/0".to_string()),
        Just("::/0".to_string()),
        Just("fd00:d06::/64".to_string()),
        Just("fd00:d06::/48".to_string()),
        Just("fe80::1/64".to_string()),
        Just("127.0.0.1/8".to_string()),
        "[ -~]{0,40}",
    ]
}

fn interfaces() -> impl Strategy<Value = Vec<InterfaceStatus>> {
    prop::collection::vec(
        ("[a-z0-9]{1,15}", prop::collection::vec(address(), 0..6))
            .prop_map(|(name, addresses)| InterfaceStatus { name, addresses }),
        0..4,
    )
}

fn trusted_net() -> IpNet {
    "fd00:d06::/64".parse().expect("a CIDR")
}

/// The addresses that differ between `a` and `b` in any other host's sets, or the first
/// difference in rules.
fn differences(a: &View, b: &View) -> Result<BTreeSet<IpNet>, String> {
    if a.len() != b.len() {
        return Err(format!("{} hosts became {}", a.len(), b.len()));
    }
    let mut changed = BTreeSet::new();
    for ((host, v4, v6, sets), (host2, v4b, v6b, sets2)) in a.iter().zip(b) {
        if host != host2 || v4 != v4b || v6 != v6b {
            return Err(format!("the rules of {host} changed"));
        }
        let names: Vec<_> = sets.iter().map(|(n, _)| n).collect();
        let names2: Vec<_> = sets2.iter().map(|(n, _)| n).collect();
        if names != names2 {
            return Err(format!(
                "the sets of {host} changed: {names:?} -> {names2:?}"
            ));
        }
        for ((_, m), (_, m2)) in sets.iter().zip(sets2) {
            changed.extend(m.symmetric_difference(m2).copied());
        }
    }
    Ok(changed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_agent_without_trust_changes_nothing_of_any_other_host(reports in prop::collection::vec(interfaces(), 1..4)) {
        let opts = CompileOptions::default();
        let base = others(&compile(&with_report(fleet(), vec![], false), &opts));
        for report in reports {
            let now = others(&compile(&with_report(fleet(), report.clone(), false), &opts));
            let diff = differences(&base, &now);
            prop_assert_eq!(diff.clone(), Ok(BTreeSet::new()), "after reporting {:?}", report);
        }
    }

    #[test]
    fn an_agent_changes_other_hosts_only_inside_its_trusted_cidrs(report in interfaces()) {
        let opts = CompileOptions::default();
        let base = others(&compile(&with_report(fleet(), vec![], true), &opts));
        let now = others(&compile(&with_report(fleet(), report.clone(), true), &opts));
        match differences(&base, &now) {
            Err(e) => prop_assert!(false, "{} after reporting {:?}", e, report),
            Ok(changed) => {
                let net = trusted_net();
                for m in &changed {
                    // single addresses inside the trusted network, never a network
                    let single = m.prefix_len() == m.max_prefix_len();
                    let inside = matches!(m.addr(), IpAddr::V6(_)) && net.contains(&m.addr());
                    prop_assert!(single && inside, "{} reached another host's set after reporting {:?}", m, report);
                }
            }
        }
    }
}

/// The property is not vacuous: a report inside the trusted network does reach the sets of
/// the hosts that allow the reporter's group.
#[test]
fn a_trusted_report_does_reach_other_hosts() {
    let opts = CompileOptions::default();
    let base = others(&compile(&with_report(fleet(), vec![], true), &opts));
    let report = vec![InterfaceStatus {
        name: "eth0".into(),
        addresses: vec!["fd00:d06::abc/64".into()],
    }];
    let now = others(&compile(&with_report(fleet(), report, true), &opts));
    let changed = differences(&base, &now).expect("rules unchanged");
    let expected: IpNet = "fd00:d06::abc/128".parse().expect("an address");
    assert!(changed.contains(&expected), "{changed:?}");
}
