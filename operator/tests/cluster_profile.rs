//! The cluster profile in compiled output: after the failsafe rules, before the profile's, and
//! each Profile's choice for traffic from the node's own pods.

use dog_operator::core::compile::{compile, CompileOptions, HostOutcome, Snapshot};
use dog_operator::crd::PodToHost;
use dog_operator::dir::load::load_dir;
use dog_protocol::ruleset::{ClusterNetwork, Failsafe, FailsafePort, FailsafeProtocol, Family};
use std::path::Path;

fn fleet() -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    load_dir(&dir).unwrap().0
}

fn opts() -> CompileOptions {
    CompileOptions {
        failsafe: Failsafe {
            cluster: ClusterNetwork {
                inbound: vec![FailsafePort::one(FailsafeProtocol::Udp, 8472)],
                outbound: vec![FailsafePort::one(FailsafeProtocol::Udp, 8472)],
                pod_interfaces: vec!["cni0".into()],
                services: true,
            },
            ..Failsafe::default()
        },
        trust_reported_addresses: vec![],
    }
}

fn input(snap: &Snapshot, host: &str) -> Vec<String> {
    let c = compile(snap, &opts());
    match &c.hosts[host] {
        HostOutcome::Firewall { firewall, .. } => firewall
            .document(Family::V4)
            .text
            .lines()
            .filter(|l| l.starts_with("-A DOG-INPUT"))
            .map(str::to_string)
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cluster_rules_come_before_profile_rules_and_pods_follow_the_profile_choice() {
    let mut snap = fleet();
    let lines = input(&snap, "web-1");
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {lines:#?}"))
    };
    let (overlay, services, pods) = (
        pos("--dport 8472 -m comment --comment \"dog:cluster:inbound\""),
        pos("--ctstate DNAT"),
        pos("-i cni0 -m comment --comment \"dog:web:pods\" -j ACCEPT"),
    );
    let first_profile_rule = pos("dog:web:in:blocklist");
    assert!(pos("dog:failsafe:inbound") < overlay);
    assert!(overlay < services && services < pods && pods < first_profile_rule);

    std::sync::Arc::make_mut(snap.profiles.get_mut("web").unwrap())
        .spec
        .pod_to_host = PodToHost::Drop;
    assert!(input(&snap, "web-1")
        .iter()
        .any(|l| l.contains("-i cni0 -m comment --comment \"dog:web:pods\" -j DROP")));
    std::sync::Arc::make_mut(snap.profiles.get_mut("web").unwrap())
        .spec
        .pod_to_host = PodToHost::Profile;
    assert!(!input(&snap, "web-1").iter().any(|l| l.contains("-i cni0")));

    // without a cluster profile nothing of it is rendered
    let plain = compile(&fleet(), &CompileOptions::default());
    let fw = plain.host_firewall("web-1").unwrap();
    assert!(!fw.ipv4.text.contains("dog:cluster") && !fw.ipv4.text.contains(":pods"));
}
