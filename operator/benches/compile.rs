//! The compiler at fleet scale.
//!
//! Two fleets of 5,000 hosts (IPv4 + IPv6 each), 500 groups (10 hosts each, label selectors),
//! 500 profiles × 20 inbound rules (peers: a Group, a Zone, `Self` or any):
//! - the *goal fleet*: 50 zones × 20,000 addresses (1,000,000), one of them dropped by every
//!   profile;
//! - the *blocklist fleet*: one 500,500-entry blocklist dropped by every profile plus 999 zones
//!   × 500 addresses (1,000,000 in all).
//!
//! `compile/…`: a full compile of each, and one change of each kind applied to a compiler
//! holding the goal fleet (each iteration flips between two versions, so every call changes
//! something): a zone entry in a 20,000-entry zone, a Host added or removed, a Host moved to
//! another group, a Group's selector, one rule of a Profile; and an entry of the 500,500-entry
//! blocklist. `scale/…`: a full compile and a Profile edit at 1k, 5k, 20k and 50k hosts
//! (groups growing with hosts, 10 per group; the 50 × 20,000 zones fixed), with the memory the
//! compiler holds at each size printed at the end. `publish/…`: the change between two
//! 1,000,000-entry sets, which the publish planner sends instead of the whole set.
//!
//! `cargo bench -p dog-operator --bench compile`

use criterion::{criterion_group, BenchmarkId, Criterion};
use dog_operator::core::compile::{compile, CompileOptions, Compiler, Edit, Snapshot};
use dog_operator::crd::*;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const HOSTS: usize = 5_000;
const RULES: usize = 20;

/// The zones of a fleet: (count, entries each), and whether one 500,500-entry blocklist leads.
#[derive(Clone, Copy)]
struct Zones {
    count: usize,
    size: usize,
    blocklist: Option<usize>,
}

const GOAL_ZONES: Zones = Zones {
    count: 50,
    size: 20_000,
    blocklist: None,
};
const BLOCKLIST_ZONES: Zones = Zones {
    count: 999,
    size: 500,
    blocklist: Some(500_500),
};

fn group_name(g: usize) -> String {
    format!("g{g:05}")
}

fn zone_name(z: usize) -> String {
    format!("z{z:03}")
}

/// Entry `i` of zone `z`: IPv4 mostly, every tenth IPv6.
fn zone_entry(z: usize, i: usize) -> String {
    if i.is_multiple_of(10) {
        format!("2001:db8:{z:x}::{i:x}")
    } else {
        format!("100.{}.{}.{}", z % 250, (i / 250) % 256, i % 250)
    }
}

fn host(h: usize, groups: usize) -> Host {
    let name = format!("host-{h:05}");
    let mut host = Host::new(
        &name,
        HostSpec {
            addresses: vec![
                format!("198.18.{}.{}", (h / 250) % 256, h % 250 + 1),
                format!("fd00:d06::{:x}", h + 1),
            ],
            ..Default::default()
        },
    );
    // half of each group's hosts are tier a
    let tier = if (h / groups).is_multiple_of(2) {
        "a"
    } else {
        "b"
    };
    host.metadata.labels = Some(BTreeMap::from([
        ("group".to_string(), group_name(h % groups)),
        ("tier".to_string(), tier.to_string()),
    ]));
    host
}

fn selector(pairs: &[(&str, &str)]) -> HostSelector {
    HostSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

fn group(g: usize, sel: HostSelector) -> Group {
    Group::new(
        &group_name(g),
        GroupSpec {
            profile: Some(format!("p{g:05}")),
            selector: Some(sel),
            ..Default::default()
        },
    )
}

fn profile(p: usize, groups: usize, zones: usize, port: u16) -> Profile {
    let mut inbound = vec![Rule {
        name: Some("blocklist".into()),
        action: Action::Drop,
        peer: Peer {
            kind: PeerKind::Zone,
            name: Some(zone_name(0)),
            cidrs: vec![],
        },
        ..rule()
    }];
    for r in 1..RULES {
        let (kind, peer_name) = match r % 4 {
            0 => (PeerKind::Group, Some(group_name((p + r) % groups))),
            1 => (
                PeerKind::Zone,
                Some(zone_name(1 + (p * 7 + r) % (zones - 1))),
            ),
            2 => (PeerKind::SelfGroup, None),
            _ => (PeerKind::Any, None),
        };
        inbound.push(Rule {
            name: Some(format!("r{r}")),
            peer: Peer {
                kind,
                name: peer_name,
                cidrs: vec![],
            },
            protocol: Protocol::Tcp,
            ports: vec![
                format!("{}", if r == 5 { port } else { 1000 + r as u16 }),
                format!("{}-{}", 2000 + r, 2100 + r),
            ],
            states: vec![ConntrackState::New],
            ..rule()
        });
    }
    Profile::new(
        &format!("p{p:05}"),
        ProfileSpec {
            inbound,
            ..Default::default()
        },
    )
}

/// `hosts` hosts in groups of ten, one profile per group, and `zones`.
fn fleet(hosts: usize, zones: Zones) -> Snapshot {
    let groups = hosts / 10;
    let mut s = Snapshot::default();
    for h in 0..hosts {
        let host = host(h, groups);
        s.hosts
            .insert(host.metadata.name.clone().unwrap(), Arc::new(host));
    }
    for g in 0..groups {
        let gr = group(g, selector(&[("group", &group_name(g))]));
        s.groups.insert(group_name(g), Arc::new(gr));
    }
    let mut zone = |name: String, addresses: Vec<String>| {
        let z = Zone::new(
            &name,
            ZoneSpec {
                addresses,
                config_map_refs: vec![],
            },
        );
        s.zones.insert(name, Arc::new(z));
    };
    let first = match zones.blocklist {
        Some(n) => {
            let block = (0..n)
                .map(|i| format!("{}.{}.{}.1", 20 + i / (1 << 16), (i >> 8) & 255, i & 255))
                .collect();
            zone(zone_name(0), block);
            1
        }
        None => 0,
    };
    for z in first..first + zones.count {
        zone(
            zone_name(z),
            (0..zones.size).map(|i| zone_entry(z, i)).collect(),
        );
    }
    let zone_count = first + zones.count;
    for p in 0..groups {
        let pr = profile(p, groups, zone_count, 1005);
        s.profiles.insert(format!("p{p:05}"), Arc::new(pr));
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

fn describe(name: &str, snap: &Snapshot) {
    let out = compile(snap, &CompileOptions::default());
    assert!(out.diagnostics.is_empty(), "{:?}", out.diagnostics);
    let total: usize = out
        .zones
        .values()
        .map(|z| (z.ipv4_count + z.ipv6_count) as usize)
        .sum();
    eprintln!(
        "{name}: {} hosts, {} groups, {} profiles x {RULES} rules, {} zones with {total} addresses, {} sets in use",
        snap.hosts.len(),
        snap.groups.len(),
        snap.profiles.len(),
        snap.zones.len(),
        out.sets.len()
    );
}

/// Benchmarks `edits` (two versions of one change, applied in turn) on a compiler holding
/// `snap`; every call must change at least one host or set.
fn flip(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    snap: &Snapshot,
    edits: [Edit; 2],
) {
    let mut compiler = Compiler::new(CompileOptions::default());
    compiler.load(snap.clone());
    let mut i = 0;
    c.bench_function(id, |b| {
        b.iter(|| {
            // the first call makes the change, the next one undoes it, and so on
            let ch = compiler.apply([edits[i % 2].clone()]);
            i += 1;
            let changed = !ch.hosts.is_empty() || !ch.sets.is_empty();
            assert!(!ch.full && changed, "{id}");
            black_box(ch)
        })
    });
}

fn changed_zone(snap: &Snapshot, name: &str, i: usize, entry: &str) -> Arc<Zone> {
    let mut z = (*snap.zones[name]).clone();
    z.spec.addresses[i] = entry.to_string();
    Arc::new(z)
}

fn bench(c: &mut Criterion) {
    let goal = fleet(HOSTS, GOAL_ZONES);
    let blocklist = fleet(HOSTS, BLOCKLIST_ZONES);
    describe("goal fleet", &goal);
    describe("blocklist fleet", &blocklist);
    let opts = CompileOptions::default();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("full_goal_fleet", |b| {
        b.iter(|| black_box(compile(&goal, &opts)))
    });
    g.bench_function("full_blocklist_fleet", |b| {
        b.iter(|| black_box(compile(&blocklist, &opts)))
    });

    g.sample_size(50).measurement_time(Duration::from_secs(5));
    let z = zone_name(7);
    flip(
        &mut g,
        "zone_entry_20k",
        &goal,
        [
            Edit::Zone(z.clone(), Some(changed_zone(&goal, &z, 1, "100.7.99.99"))),
            Edit::Zone(z.clone(), Some(goal.zones[&z].clone())),
        ],
    );
    let new_host = host(HOSTS + 1, HOSTS / 10);
    flip(
        &mut g,
        "host_added_removed",
        &goal,
        [
            Edit::Host("host-new".into(), Some(Arc::new(new_host))),
            Edit::Host("host-new".into(), None),
        ],
    );
    let moved = {
        let mut h = (*goal.hosts["host-00042"]).clone();
        h.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("group".into(), group_name(43));
        Arc::new(h)
    };
    flip(
        &mut g,
        "host_relabelled",
        &goal,
        [
            Edit::Host("host-00042".into(), Some(moved)),
            Edit::Host("host-00042".into(), Some(goal.hosts["host-00042"].clone())),
        ],
    );
    let narrowed = group(42, selector(&[("group", &group_name(42)), ("tier", "a")]));
    flip(
        &mut g,
        "group_selector",
        &goal,
        [
            Edit::Group(group_name(42), Some(Arc::new(narrowed))),
            Edit::Group(group_name(42), Some(goal.groups[&group_name(42)].clone())),
        ],
    );
    let zones = goal.zones.len();
    let edited = profile(42, HOSTS / 10, zones, 1105);
    flip(
        &mut g,
        "profile_edited",
        &goal,
        [
            Edit::Profile("p00042".into(), Some(Arc::new(edited))),
            Edit::Profile("p00042".into(), Some(goal.profiles["p00042"].clone())),
        ],
    );
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    let b0 = zone_name(0);
    flip(
        &mut g,
        "zone_entry_500k_blocklist",
        &blocklist,
        [
            Edit::Zone(
                b0.clone(),
                Some(changed_zone(&blocklist, &b0, 1, "19.0.0.1")),
            ),
            Edit::Zone(b0.clone(), Some(blocklist.zones[&b0].clone())),
        ],
    );
    g.finish();
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn scale(c: &mut Criterion) {
    let mut g = c.benchmark_group("scale");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut memory = Vec::new();
    for hosts in [1_000, 5_000, 20_000, 50_000] {
        let snap = fleet(hosts, GOAL_ZONES);
        let opts = CompileOptions::default();
        g.bench_with_input(BenchmarkId::new("full", hosts), &snap, |b, s| {
            b.iter(|| black_box(compile(s, &opts)))
        });
        // what a compiler holding this fleet costs, beyond the snapshot itself
        let before = rss_mib();
        let mut compiler = Compiler::new(opts.clone());
        compiler.load(snap.clone());
        memory.push((hosts, rss_mib() - before));
        let zones = snap.zones.len();
        let edits = [
            Edit::Profile(
                "p00042".into(),
                Some(Arc::new(profile(42, hosts / 10, zones, 1105))),
            ),
            Edit::Profile("p00042".into(), Some(snap.profiles["p00042"].clone())),
        ];
        let mut i = 0;
        g.bench_function(BenchmarkId::new("profile_edited", hosts), |b| {
            b.iter(|| {
                let ch = compiler.apply([edits[i % 2].clone()]);
                i += 1;
                black_box(ch)
            })
        });
        let moved = {
            let mut h = (*snap.hosts["host-00042"]).clone();
            h.metadata
                .labels
                .as_mut()
                .unwrap()
                .insert("group".into(), group_name(43));
            Arc::new(h)
        };
        let edits = [
            Edit::Host("host-00042".into(), Some(moved)),
            Edit::Host("host-00042".into(), Some(snap.hosts["host-00042"].clone())),
        ];
        let mut i = 0;
        g.bench_function(BenchmarkId::new("host_relabelled", hosts), |b| {
            b.iter(|| {
                let ch = compiler.apply([edits[i % 2].clone()]);
                i += 1;
                black_box(ch)
            })
        });
    }
    g.finish();
    for (hosts, mib) in memory {
        eprintln!("scale: compiler holding {hosts} hosts: +{mib:.0} MiB resident");
    }
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
        b.iter(|| black_box(dog_operator::core::publish::set_change(&old, &new, 1)))
    });
    g.finish();
}

criterion_group!(benches, bench, scale, set_change);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for l in status.lines().filter(|l| l.starts_with("VmHWM")) {
            eprintln!("peak RSS: {l}");
        }
    }
}
