//! Compiler at fleet scale: 5,000 hosts, 500 groups, 500 profiles × 20 rules and zones
//! totalling 1,000,000 addresses (one 500k blocklist used by every profile, 999 small zones).
//! (a) full compile, (b) recompile after one entry of one small zone changes, (c) the same
//! fleet shape at 20,000 hosts and 2,000 groups (10 hosts per group) for the growth, and
//! (d) resolving every host's groups at that size by the index against checking every group,
//! and (e) the change (added and removed members) from a 1,000,000-entry set to the same set
//! with one entry replaced, which the publish planner sends instead of the whole set.
//! Prints the process's peak RSS (VmHWM) at the end.
//!
//! `cargo bench -p dog-operator --bench compile`

use criterion::{criterion_group, Criterion};
use dog_operator::compile::resolve::{groups_of, GroupIndex};
use dog_operator::compile::{compile, CompileOptions, Compiler, Edit, Snapshot};
use dog_operator::crd::*;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const HOSTS: usize = 5_000;
const GROUPS: usize = 500;
const RULES: usize = 20;
const SMALL_ZONES: usize = 999;
const SMALL_ZONE_SIZE: usize = 500;
const BLOCKLIST: usize = 1_000_000 - SMALL_ZONES * SMALL_ZONE_SIZE;

fn group_name(g: usize) -> String {
    format!("g{g:04}")
}

fn fleet() -> Snapshot {
    fleet_sized(HOSTS, GROUPS)
}

/// `hosts` hosts spread over `groups` groups (one profile each) and the zones above.
fn fleet_sized(hosts: usize, groups: usize) -> Snapshot {
    let mut s = Snapshot::default();
    for h in 0..hosts {
        let name = format!("host-{h:05}");
        let mut host = Host::new(
            &name,
            HostSpec {
                addresses: vec![
                    format!("198.18.{}.{}", h / 250, h % 250 + 1),
                    format!("fd00:d06::{:x}", h + 1),
                ],
                ..Default::default()
            },
        );
        host.metadata.labels = Some(BTreeMap::from([(
            "group".to_string(),
            group_name(h % groups),
        )]));
        s.hosts.insert(name, Arc::new(host));
    }
    for g in 0..groups {
        let name = group_name(g);
        s.groups.insert(
            name.clone(),
            Arc::new(Group::new(
                &name,
                GroupSpec {
                    profile: Some(format!("p{g:04}")),
                    selector: Some(HostSelector {
                        match_labels: BTreeMap::from([("group".to_string(), name.clone())]),
                        match_expressions: vec![],
                    }),
                    ..Default::default()
                },
            )),
        );
    }
    let block: Vec<String> = (0..BLOCKLIST)
        .map(|i| {
            format!(
                "{}.{}.{}.{}",
                20 + i / (1 << 16),
                (i >> 8) & 255,
                i & 255,
                1
            )
        })
        .collect();
    s.zones.insert(
        "blocklist".into(),
        Arc::new(Zone::new(
            "blocklist",
            ZoneSpec {
                addresses: block,
                config_map_refs: vec![],
            },
        )),
    );
    for z in 0..SMALL_ZONES {
        let name = format!("z{z:03}");
        let addrs = (0..SMALL_ZONE_SIZE)
            .map(|i| {
                if i % 10 == 0 {
                    format!("2001:db8:{z:x}::{i:x}")
                } else {
                    format!("100.{}.{}.{}", z % 250, i / 250, i % 250)
                }
            })
            .collect();
        s.zones.insert(
            name.clone(),
            Arc::new(Zone::new(
                &name,
                ZoneSpec {
                    addresses: addrs,
                    config_map_refs: vec![],
                },
            )),
        );
    }
    for p in 0..groups {
        let name = format!("p{p:04}");
        let mut inbound = vec![Rule {
            name: Some("blocklist".into()),
            action: Action::Drop,
            peer: Peer {
                kind: PeerKind::Zone,
                name: Some("blocklist".into()),
                cidrs: vec![],
            },
            ..rule()
        }];
        for r in 1..RULES {
            let (kind, peer_name) = match r % 4 {
                0 => (PeerKind::Group, Some(group_name((p + r) % groups))),
                1 => (
                    PeerKind::Zone,
                    Some(format!("z{:03}", (p * 7 + r) % SMALL_ZONES)),
                ),
                2 => (PeerKind::SelfGroup, None),
                _ => (PeerKind::Any, None),
            };
            inbound.push(Rule {
                peer: Peer {
                    kind,
                    name: peer_name,
                    cidrs: vec![],
                },
                protocol: Protocol::Tcp,
                ports: vec![
                    format!("{}", 1000 + r),
                    format!("{}-{}", 2000 + r, 2100 + r),
                ],
                states: vec![ConntrackState::New],
                ..rule()
            });
        }
        s.profiles.insert(
            name.clone(),
            Arc::new(Profile::new(
                &name,
                ProfileSpec {
                    inbound,
                    ..Default::default()
                },
            )),
        );
    }
    s
}

fn rule() -> Rule {
    Rule {
        name: None,
        action: Action::Accept,
        peer: Peer::default(),
        protocol: Protocol::Any,
        ports: vec![],
        icmp_type: None,
        interface: None,
        states: vec![],
        type_: RuleType::Basic,
        connlimit: None,
        recent: None,
        log: false,
        log_prefix: None,
        comment: None,
        enabled: true,
    }
}

fn bench(c: &mut Criterion) {
    let snap = fleet();
    let opts = CompileOptions::default();
    let out = compile(&snap, &opts);
    assert!(out.diagnostics.is_empty(), "{:?}", out.diagnostics);
    let total: usize = out
        .zones
        .values()
        .map(|z| (z.ipv4_count + z.ipv6_count) as usize)
        .sum();
    eprintln!(
        "fleet: {} hosts, {} groups, {} profiles x {RULES} rules, {} zones with {total} addresses, {} sets in use",
        snap.hosts.len(),
        snap.groups.len(),
        snap.profiles.len(),
        snap.zones.len(),
        out.sets.len()
    );
    drop(out);

    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("full", |b| b.iter(|| black_box(compile(&snap, &opts))));

    let mut compiler = Compiler::new(opts.clone());
    compiler.load(snap.clone());
    let zone = snap.zones["z042"].clone();
    let mut changed = (*zone).clone();
    changed.spec.addresses[1] = "100.42.99.99".into();
    let changed = Arc::new(changed);
    let mut flip = false;
    g.sample_size(50).measurement_time(Duration::from_secs(5));
    g.bench_function("one_zone_entry", |b| {
        b.iter(|| {
            flip = !flip;
            let z = if flip { changed.clone() } else { zone.clone() };
            let ch = compiler.apply([Edit::Zone("z042".into(), Some(z))]);
            assert!(!ch.full && !ch.hosts.is_empty());
            black_box(ch)
        })
    });

    let big = fleet_sized(4 * HOSTS, 4 * GROUPS);
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    g.bench_function("full_20k_hosts_2k_groups", |b| {
        b.iter(|| black_box(compile(&big, &opts)))
    });
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("memberships_20k_index", |b| {
        b.iter(|| {
            let index = GroupIndex::new(&big.groups);
            let n: usize = big
                .hosts
                .values()
                .map(|h| index.groups_of(h, &big.groups).len())
                .sum();
            assert_eq!(n, big.hosts.len());
            black_box(n)
        })
    });
    g.bench_function("memberships_20k_every_group", |b| {
        b.iter(|| {
            let n: usize = big
                .hosts
                .values()
                .map(|h| groups_of(h, &big.groups).len())
                .sum();
            black_box(n)
        })
    });
    g.finish();
}

fn set_change(c: &mut Criterion) {
    use dog_protocol::ruleset::{Family, IpSet};
    let member = |i: u32| {
        ipnet::IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(
            0x1000_0000 + i * 2,
        )))
    };
    let old = IpSet::new("dogz4-blocklist", Family::V4, (0..1_000_000).map(member));
    let new = IpSet::new(
        "dogz4-blocklist",
        Family::V4,
        (0..1_000_000)
            .filter(|i| *i != 7)
            .chain([1_000_000])
            .map(member),
    );
    let mut g = c.benchmark_group("publish");
    g.sample_size(20);
    g.bench_function("set_change_1M_one_entry", |b| {
        b.iter(|| black_box(dog_operator::publish::set_change(&old, &new, 1)))
    });
    g.finish();
}

criterion_group!(benches, bench, set_change);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for l in status.lines().filter(|l| l.starts_with("VmHWM")) {
            eprintln!("peak RSS: {l}");
        }
    }
}
