//! Apply cost against the physical limit: dog's `apply` (plan, writes, and the proof that the
//! kernel holds what was sent) versus the bare tool on the same content, in the same run,
//! inside a throwaway network namespace. `bench/apply.sh` runs this and prints the ratios.
//!
//! Groups: `rules/N` (N rules per family, every rule changes each iteration), `sets/N` (one
//! set of N entries replaced each iteration), `delta/1000` (one entry of a 1,000-entry set
//! added/removed through `apply`). `dog` reaches the sets through netlink (the default),
//! `dog-cli` through the `ipset` tool (the fallback); `raw` is one bare `ipset restore` (or
//! `iptables-restore` per family). Set `DOG_BENCH_MAX_SET` to cap the set sizes.

use criterion::{criterion_group, BenchmarkId, Criterion};
use dog_agent::apply::Applier;
use dog_agent::core::members::SetContent;
use dog_agent::core::sets::render_fill;
use dog_agent::kernel::exec::Runner;
use dog_agent::kernel::{BackendChoice, KernelConfig, SetBackendChoice};
use dog_agent::netns::NetNs;
use dog_protocol::ruleset::{
    Failsafe, Family, HostFirewall, IpSet, RulesDocument, CHAIN_INPUT, CHAIN_OUTPUT,
};
use ipnet::{IpNet, Ipv4Net};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

fn kernel_with(sets: SetBackendChoice) -> Applier {
    // the bench process has entered the namespace; tools and sockets inherit it
    Applier::new(KernelConfig {
        netns: None,
        backend: BackendChoice::Nft,
        sets,
        broker_port: Some(5672),
        lock_wait_secs: 5,
    })
    .unwrap()
}

fn kernel() -> Applier {
    kernel_with(SetBackendChoice::Netlink)
}

/// The two ways dog reaches the sets, by benchmark id.
const WAYS: [(&str, SetBackendChoice); 2] = [
    ("dog", SetBackendChoice::Netlink),
    ("dog-cli", SetBackendChoice::Cli),
];

/// One bare `ipset restore` of `script` (`-exist` when asked).
fn raw_ipset(script: &str, exist: bool) {
    let args: &[&str] = if exist {
        &["restore", "-exist"]
    } else {
        &["restore"]
    };
    Runner::default()
        .run("ipset", args, Some(script.as_bytes()))
        .unwrap();
}

fn document(fs: &Failsafe, family: Family, rules: Vec<String>) -> RulesDocument {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut input = fs.prologue(family, CHAIN_INPUT);
    input.push("-A DOG-INPUT -j DOG-PROFILE".into());
    input.push("-A DOG-INPUT -j DROP".into());
    chains.insert(CHAIN_INPUT.into(), input);
    let mut output = fs.prologue(family, CHAIN_OUTPUT);
    output.push("-A DOG-OUTPUT -j ACCEPT".into());
    chains.insert(CHAIN_OUTPUT.into(), output);
    chains.insert("DOG-PROFILE".into(), rules);
    RulesDocument::from_chains(family, &chains)
}

/// `n` rules per family; `variant` shifts every port so each rule differs between variants.
fn rules_firewall(n: usize, variant: u16) -> HostFirewall {
    let fs = Failsafe::default();
    let rule = |family: Family, i: usize| {
        let src = match family {
            Family::V4 => format!("10.{}.{}.0/24", i / 256 % 256, i % 256),
            Family::V6 => format!("fd00:{:x}:1::/64", i),
        };
        format!(
            "-A DOG-PROFILE -s {src} -p tcp -m tcp --dport {} -j ACCEPT",
            1000 + (i as u16 % 20000) + variant
        )
    };
    HostFirewall {
        host: "bench".into(),
        ipv4: document(
            &fs,
            Family::V4,
            (0..n).map(|i| rule(Family::V4, i)).collect(),
        ),
        ipv6: document(
            &fs,
            Family::V6,
            (0..n).map(|i| rule(Family::V6, i)).collect(),
        ),
        sets: BTreeMap::new(),
        failsafe: fs,
    }
}

fn members(n: usize, base: u32) -> Vec<IpNet> {
    (0..n as u32)
        .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base + i), 32).unwrap()))
        .collect()
}

fn set_firewall(set: IpSet) -> HostFirewall {
    let fs = Failsafe::default();
    let v4 = vec![format!(
        "-A DOG-PROFILE -p tcp -m set --match-set {} src -m tcp --dport 443 -j ACCEPT",
        set.name
    )];
    HostFirewall {
        host: "bench".into(),
        ipv4: document(&fs, Family::V4, v4),
        ipv6: document(&fs, Family::V6, vec![]),
        sets: [(set.name.clone(), set)].into_iter().collect(),
        failsafe: fs,
    }
}

fn raw_restore(family: Family, text: &str) {
    let tool = match family {
        Family::V4 => "iptables-nft-restore",
        Family::V6 => "ip6tables-nft-restore",
    };
    Runner::default()
        .run(tool, &["--noflush", "-w", "5"], Some(text.as_bytes()))
        .unwrap();
}

fn bench_rules(c: &mut Criterion) {
    let mut g = c.benchmark_group("rules");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for n in [100usize, 1_000, 10_000] {
        let fws = [rules_firewall(n, 0), rules_firewall(n, 1)];
        let k = kernel();
        k.remove_all().unwrap();
        k.apply(&fws[0]).unwrap();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("dog", n), |b| {
            b.iter(|| {
                i += 1;
                let r = k.apply(&fws[i % 2]).unwrap();
                assert!(r.plan.rules.v4.restore.is_some());
            })
        });
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("raw", n), |b| {
            b.iter(|| {
                i += 1;
                for f in Family::BOTH {
                    raw_restore(f, &fws[i % 2].document(f).text);
                }
            })
        });
    }
    g.finish();
}

fn max_set() -> usize {
    std::env::var("DOG_BENCH_MAX_SET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn bench_sets(c: &mut Criterion) {
    let mut g = c.benchmark_group("sets");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [1_000usize, 100_000, 1_000_000] {
        if n > max_set() {
            continue;
        }
        let name = "dogz4-bench";
        let sets = [
            IpSet::new(name, Family::V4, members(n, 0x0a00_0000)),
            IpSet::new(name, Family::V4, members(n, 0x0b00_0000)),
        ];
        let fws = [set_firewall(sets[0].clone()), set_firewall(sets[1].clone())];
        for (id, way) in WAYS {
            let k = kernel_with(way);
            k.remove_all().unwrap();
            k.apply(&fws[0]).unwrap();
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new(id, n), |b| {
                b.iter(|| {
                    i += 1;
                    let r = k.apply(&fws[i % 2]).unwrap();
                    assert_eq!(r.plan.sets.swap.len(), 1);
                })
            });
        }
        let k = kernel();
        // raw: the same swap done by hand with one `ipset restore`
        let scripts: Vec<String> = sets
            .iter()
            .map(|s| {
                let mut t = String::new();
                render_fill(&mut t, &SetContent::from(s.clone()), "dogtmp-raw");
                t.push_str(&format!("swap dogtmp-raw {name}\ndestroy dogtmp-raw\n"));
                t
            })
            .collect();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("raw", n), |b| {
            b.iter(|| {
                i += 1;
                raw_ipset(&scripts[i % 2], false);
            })
        });
        k.remove_all().unwrap();
    }
    g.finish();
}

fn bench_delta(c: &mut Criterion) {
    let mut g = c.benchmark_group("delta");
    g.sample_size(50);
    let name = "dogz4-delta";
    let base = members(1_000, 0x0a00_0000);
    let one: IpNet = "192.0.2.1/32".parse().unwrap();
    let fws = [
        set_firewall(IpSet::new(name, Family::V4, base.clone())),
        set_firewall(IpSet::new(
            name,
            Family::V4,
            base.iter().copied().chain([one]),
        )),
    ];
    for (id, way) in WAYS {
        let k = kernel_with(way);
        k.remove_all().unwrap();
        k.apply(&fws[0]).unwrap();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new(id, 1_000), |b| {
            b.iter(|| {
                i += 1;
                let r = k.apply(&fws[i % 2]).unwrap();
                assert_eq!(r.plan.sets.delta.len(), 1);
            })
        });
    }
    let k = kernel();
    let scripts = [
        format!("del {name} 192.0.2.1\n"),
        format!("add {name} 192.0.2.1\n"),
    ];
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("raw", 1_000), |b| {
        b.iter(|| {
            i += 1;
            raw_ipset(&scripts[i % 2], true);
        })
    });
    k.remove_all().unwrap();
    g.finish();
}

criterion_group!(benches, bench_delta, bench_rules, bench_sets);

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("apply bench: needs root (it runs in a throwaway network namespace); skipped");
        return;
    }
    let ns = NetNs::new().expect("create bench netns");
    ns.enter_current_thread().expect("enter bench netns");
    benches();
    Criterion::default().configure_from_args().final_summary();
    drop(ns);
}
