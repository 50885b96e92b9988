//! Shared helpers for the kernel tests: firewall builders and namespace-backed kernels.
#![allow(dead_code)]

use dog_agent::apply::Applier;
use dog_agent::kernel::{BackendChoice, KernelConfig, SetBackendChoice};
use dog_agent::netns::NetNs;
use dog_protocol::ruleset::{
    Failsafe, Family, HostFirewall, IpSet, RulesDocument, CHAIN_INPUT, CHAIN_OUTPUT,
};
use std::collections::BTreeMap;

pub const BACKENDS: [BackendChoice; 2] = [BackendChoice::Nft, BackendChoice::Legacy];

/// An applier in `ns`. The nft backend's sets go through netlink, the legacy backend's through
/// the `ipset` tool, so every test that runs both backends runs both ways to the sets.
pub fn kernel(ns: &NetNs, backend: BackendChoice) -> Applier {
    Applier::new(KernelConfig {
        netns: Some(ns.name().to_string()),
        backend,
        sets: match backend {
            BackendChoice::Nft => SetBackendChoice::Netlink,
            BackendChoice::Legacy => SetBackendChoice::Cli,
            BackendChoice::Auto => SetBackendChoice::Auto,
        },
        broker_port: Some(5672),
        lock_wait_secs: 5,
    })
    .unwrap()
}

/// A document of `family` rendered from `failsafe`: dog's chains start with the prologue,
/// followed by `rules` (full `-A CHAIN …` lines, any DOG- chain; other chains are declared
/// as they appear); DOG-OUTPUT ends with ACCEPT.
pub fn document(failsafe: &Failsafe, family: Family, rules: &[&str]) -> RulesDocument {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    chains.insert(CHAIN_INPUT.into(), failsafe.prologue(family, CHAIN_INPUT));
    chains.insert(CHAIN_OUTPUT.into(), failsafe.prologue(family, CHAIN_OUTPUT));
    for r in rules {
        let chain = r.split_whitespace().nth(1).unwrap().to_string();
        chains.entry(chain).or_default().push(r.to_string());
    }
    chains
        .get_mut(CHAIN_OUTPUT)
        .unwrap()
        .push("-A DOG-OUTPUT -j ACCEPT".into());
    RulesDocument::from_chains(family, &chains)
}

pub fn set(name: &str, family: Family, members: &[&str]) -> IpSet {
    IpSet::new(
        name,
        family,
        members
            .iter()
            .map(|m| dog_protocol::ruleset::parse_member(m).unwrap()),
    )
}

pub fn firewall(v4: &[&str], v6: &[&str], sets: Vec<IpSet>) -> HostFirewall {
    let fs = Failsafe::default();
    HostFirewall {
        host: "test-node".into(),
        ipv4: document(&fs, Family::V4, v4),
        ipv6: document(&fs, Family::V6, v6),
        sets: sets.into_iter().map(|s| (s.name.clone(), s)).collect(),
        failsafe: fs,
    }
}

pub fn many(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}.{}.{}", i / 256, i % 256))
        .collect()
}

/// The base firewall used by most tests: a v4 set referenced twice, a v6 set, a set that a
/// later firewall drops, and a 300-member set.
pub fn fw1() -> HostFirewall {
    let big = many("10.1", 300);
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    firewall(
        &[
            "-A DOG-INPUT -j DOG-PROFILE",
            "-A DOG-PROFILE -p tcp -m set --match-set dogz4-web src -m tcp --dport 80 -j ACCEPT",
            "-A DOG-PROFILE -p tcp -m set --match-set dogz4-old src -m tcp --dport 81 -j ACCEPT",
            "-A DOG-PROFILE -p tcp -m set --match-set dogz4-big src -m tcp --dport 82 -j ACCEPT",
            "-A DOG-PROFILE -s 198.18.0.0/15 -p udp -m udp --dport 53 -j ACCEPT",
            "-A DOG-INPUT -j DROP",
        ],
        &[
            "-A DOG-INPUT -p tcp -m set --match-set dogz6-web src -m tcp --dport 80 -j ACCEPT",
            "-A DOG-INPUT -s fd00:d06::/64 -p tcp -m tcp --dport 81 -j ACCEPT",
            "-A DOG-INPUT -j DROP",
        ],
        vec![
            set("dogz4-web", Family::V4, &["198.18.1.0/24", "198.18.2.5"]),
            set("dogz4-old", Family::V4, &["10.0.0.0/8"]),
            set("dogz4-big", Family::V4, &big),
            set(
                "dogz6-web",
                Family::V6,
                &["fd00:d06:1::/64", "fd00:d06:2::7"],
            ),
        ],
    )
}

/// fw1 changed: one member added to dogz4-web (delta), dogz4-big replaced (swap), dogz4-old
/// and its rule gone (destroy), port 80 → 443 (rule change), a v6 set member removed.
pub fn fw2() -> HostFirewall {
    let big = many("10.2", 300);
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    firewall(
        &[
            "-A DOG-INPUT -j DOG-PROFILE",
            "-A DOG-PROFILE -p tcp -m set --match-set dogz4-web src -m tcp --dport 443 -j ACCEPT",
            "-A DOG-PROFILE -p tcp -m set --match-set dogz4-big src -m tcp --dport 82 -j ACCEPT",
            "-A DOG-PROFILE -s 198.18.0.0/15 -p udp -m udp --dport 53 -j ACCEPT",
            "-A DOG-INPUT -j DROP",
        ],
        &[
            "-A DOG-INPUT -p tcp -m set --match-set dogz6-web src -m tcp --dport 80 -j ACCEPT",
            "-A DOG-INPUT -s fd00:d06::/64 -p tcp -m tcp --dport 81 -j ACCEPT",
            "-A DOG-INPUT -j DROP",
        ],
        vec![
            set(
                "dogz4-web",
                Family::V4,
                &["198.18.1.0/24", "198.18.2.5", "198.18.3.0/24"],
            ),
            set("dogz4-big", Family::V4, &big),
            set("dogz6-web", Family::V6, &["fd00:d06:1::/64"]),
        ],
    )
}

/// Everything in the namespace's filter+nat tables (both families, both backends) and all
/// ipsets, with counters and comment lines removed: a byte-comparable fingerprint.
pub fn full_state(ns: &NetNs) -> String {
    let mut out = String::new();
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        for table in ["filter", "nat"] {
            let text = ns.exec(&[tool, "-t", table]).unwrap();
            out.push_str(&format!("## {tool} {table}\n"));
            for l in text.lines().filter(|l| !l.starts_with('#')) {
                out.push_str(&strip_counters(l));
                out.push('\n');
            }
        }
    }
    out.push_str("## ipset\n");
    out.push_str(&ns.exec(&["ipset", "save"]).unwrap());
    out
}

fn strip_counters(line: &str) -> String {
    match (line.starts_with(':'), line.rfind(" [")) {
        (true, Some(i)) => line[..i].to_string(),
        _ => line.to_string(),
    }
}

/// [`full_state`] without anything of dog's (its chains, rules, jumps and sets).
pub fn foreign_state(ns: &NetNs) -> String {
    let mut out = String::new();
    let mut skip_set = false;
    for l in full_state(ns).lines() {
        if l.starts_with("create ") {
            skip_set = l.split_whitespace().nth(1).unwrap().starts_with("dog");
        }
        if l.contains("DOG-") || (skip_set && (l.starts_with("create ") || l.starts_with("add "))) {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}
