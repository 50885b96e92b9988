//! The kernel layer against real iptables/ipset inside throwaway network namespaces, on both
//! the nft and the legacy backend.

mod common;

use common::*;
use dog_agent::apply::Applier;
use dog_agent::apply::ApplyError;
use dog_agent::kernel::{Backend, BackendChoice, KernelConfig, SetBackend, SetBackendChoice};
use dog_agent::netns::{self, NetNs};
use dog_protocol::messages::SetDelta;
use dog_protocol::ruleset::{
    parse_ipset_save, Failsafe, FailsafePort, FailsafeProtocol, Family, HostFirewall, RulesDocument,
};
use std::path::Path;

fn dog_sets(ns: &NetNs) -> Vec<String> {
    ns.exec(&["ipset", "list", "-n"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("dog"))
        .map(str::to_string)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[test]
fn apply_reads_back_is_idempotent_and_applies_changes() {
    if !netns::available("apply_reads_back_is_idempotent_and_applies_changes") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        let k = kernel(&ns, backend);
        let (a, b) = (fw1(), fw2());

        let r = k.apply(&a).unwrap();
        assert!(r.changed());
        assert_eq!(r.hashes, a.hashes());
        assert_eq!(r.plan.sets.create.len(), 4, "{backend:?}");
        assert_eq!(k.live_hashes().unwrap(), a.hashes());
        let input = ns
            .exec(&[
                &format!(
                    "iptables-{}",
                    if backend == BackendChoice::Nft {
                        "nft"
                    } else {
                        "legacy"
                    }
                ),
                "-S",
                "INPUT",
            ])
            .unwrap();
        assert!(input.contains("-A INPUT -j DOG-INPUT"), "{input}");

        // idempotent: with the cache, and from a fresh kernel (restart)
        let r = k.apply(&a).unwrap();
        assert!(!r.changed(), "{:?}", r.plan);
        let fresh = kernel(&ns, backend);
        let r = fresh.apply(&a).unwrap();
        assert!(!r.changed(), "{:?}", r.plan);
        assert!(fresh.verify(&a).unwrap().is_clean());

        // changes: delta, swap, destroy after the rule is gone, rule text
        let r = k.apply(&b).unwrap();
        assert_eq!(r.hashes, b.hashes());
        let delta_names: Vec<&str> = r.plan.sets.delta.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(delta_names, vec!["dogz4-web", "dogz6-web"]);
        assert_eq!(r.plan.sets.swap, vec!["dogz4-big"]);
        assert_eq!(r.plan.sets.destroy, vec!["dogz4-old"]);
        assert!(r.plan.sets.create.is_empty());
        assert!(r.plan.rules.v4.restore.is_some() && r.plan.rules.v6.restore.is_none());
        assert_eq!(
            dog_sets(&ns),
            vec!["dogz4-big", "dogz4-web", "dogz6-web"],
            "old set destroyed, no temporary left"
        );
        assert_eq!(fresh.live_hashes().unwrap(), b.hashes());
        assert!(fresh.verify(&b).unwrap().is_clean());

        // back again through a fresh kernel
        let r = fresh.apply(&a).unwrap();
        assert_eq!(r.plan.sets.create, vec!["dogz4-old"]);
        assert_eq!(k.live_hashes().unwrap(), a.hashes());
    }
}

#[test]
fn refuses_unsafe_documents_without_touching_the_kernel() {
    if !netns::available("refuses_unsafe_documents_without_touching_the_kernel") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let k = kernel(&ns, BackendChoice::Nft);
    k.apply(&fw1()).unwrap();
    let before = full_state(&ns);

    // a prologue rule missing
    let mut missing = fw2();
    let text = missing.ipv6.text.replace(
        "-A DOG-INPUT -i lo -m comment --comment \"dog:failsafe:loopback\" -j ACCEPT\n",
        "",
    );
    assert_ne!(text, missing.ipv6.text);
    missing.ipv6.text = text;
    let e = k.apply(&missing).unwrap_err();
    assert!(
        matches!(e, ApplyError::Failsafe(_)) && e.is_refusal(),
        "{e}"
    );

    // a failsafe list that does not keep the broker port open
    let mut fs = Failsafe::default();
    fs.outbound
        .retain(|p| p.protocol != FailsafeProtocol::Tcp || p.from != 5672);
    fs.outbound
        .push(FailsafePort::one(FailsafeProtocol::Tcp, 5671));
    let blocked = HostFirewall {
        ipv4: document(&fs, Family::V4, &[]),
        ipv6: document(&fs, Family::V6, &[]),
        failsafe: fs,
        ..fw2()
    };
    let e = k.apply(&blocked).unwrap_err();
    assert!(e.to_string().contains("5672"), "{e}");

    // a document that would touch a chain dog does not own
    let mut foreign = fw2();
    foreign.ipv4 = RulesDocument {
        family: Family::V4,
        text: foreign
            .ipv4
            .text
            .replace("COMMIT\n", "-A INPUT -j DROP\nCOMMIT\n"),
    };
    let e = k.apply(&foreign).unwrap_err();
    assert!(matches!(e, ApplyError::Document(_)), "{e}");

    assert!(k.plan(&missing).unwrap_err().is_refusal());
    assert_eq!(full_state(&ns), before, "kernel untouched");
}

#[test]
fn failing_apply_keeps_previous_rules_and_reports_tool_error() {
    if !netns::available("failing_apply_keeps_previous_rules_and_reports_tool_error") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        let k = kernel(&ns, backend);
        let a = fw1();
        k.apply(&a).unwrap();

        // a rule referencing a set that does not exist, plus a new set in the same apply
        let mut bad = fw2();
        bad.ipv4 = document(
            &bad.failsafe,
            Family::V4,
            &[
                "-A DOG-INPUT -p tcp -m set --match-set dogz4-nosuch src -m tcp --dport 1 -j ACCEPT",
                "-A DOG-INPUT -p tcp -m set --match-set dogz4-new src -m tcp --dport 2 -j ACCEPT",
            ],
        );
        bad.sets.insert(
            "dogz4-new".into(),
            set("dogz4-new", Family::V4, &["192.0.2.0/24"]),
        );
        let e = k.apply(&bad).unwrap_err();
        let stderr = e.tool_stderr().unwrap_or_default().to_string();
        assert!(stderr.contains("dogz4-nosuch"), "{backend:?}: {e}");
        assert_eq!(k.live_hashes().unwrap().ipv4_rules, a.hashes().ipv4_rules);
        assert!(!dog_sets(&ns).contains(&"dogz4-new".to_string()));

        // an invalid rule line in IPv6 after a valid IPv4 change: IPv4 rolled back
        let mut bad6 = fw1();
        bad6.ipv4 = document(
            &bad6.failsafe,
            Family::V4,
            &["-A DOG-INPUT -p tcp -m tcp --dport 9 -j DROP"],
        );
        bad6.ipv6 = document(
            &bad6.failsafe,
            Family::V6,
            &["-A DOG-INPUT -p tcp -m tcp --dport notaport -j DROP"],
        );
        let e = k.apply(&bad6).unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");
        assert!(e.tool_stderr().unwrap().contains("notaport"), "{e}");
        let live = k.live_hashes().unwrap();
        assert_eq!(
            live.ipv4_rules,
            a.hashes().ipv4_rules,
            "{backend:?}: IPv4 rolled back"
        );
        assert_eq!(live.ipv6_rules, a.hashes().ipv6_rules);
        assert!(
            k.verify(&a).unwrap().is_clean(),
            "{:?}",
            k.verify(&a).unwrap().lines()
        );
    }
}

#[test]
fn drift_is_reported_exactly_and_repaired() {
    if !netns::available("drift_is_reported_exactly_and_repaired") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        let k = kernel(&ns, backend);
        let a = fw1();
        k.apply(&a).unwrap();
        let ipt = match backend {
            BackendChoice::Legacy => "iptables-legacy",
            _ => "iptables-nft",
        };
        let rule = "-A DOG-PROFILE -s 198.18.0.0/15 -p udp -m udp --dport 53 -j ACCEPT";
        let spec: Vec<&str> = rule.split_whitespace().skip(1).collect();
        let mut del = vec![ipt, "-w", "-D"];
        del.extend(spec);
        ns.exec(&del).unwrap();
        ns.exec(&["ipset", "flush", "dogz4-web"]).unwrap();
        ns.exec(&[ipt, "-w", "-D", "OUTPUT", "-j", "DOG-OUTPUT"])
            .unwrap();

        let d = k.verify(&a).unwrap();
        assert!(!d.is_clean());
        assert_eq!(d.rules.v4.chains.len(), 1, "{:?}", d.lines());
        assert_eq!(d.rules.v4.chains[0].chain, "DOG-PROFILE");
        assert_eq!(d.rules.v4.chains[0].missing, vec![rule]);
        assert!(d.rules.v4.chains[0].extra.is_empty());
        assert_eq!(d.rules.v4.jumps.len(), 1);
        assert_eq!(d.rules.v4.jumps[0].0, "OUTPUT");
        assert!(d.rules.v6.chains.is_empty() && d.rules.v6.jumps.is_empty());
        assert_eq!(d.sets.len(), 1);
        assert_eq!(d.sets[0].name, "dogz4-web");
        assert_eq!(d.sets[0].missing_members, a.sets["dogz4-web"].members);
        assert!(d.sets[0].extra_members.is_empty());
        assert_ne!(d.live, d.expected);

        let r = k.repair(&a).unwrap();
        assert_eq!(r.plan.sets.delta.len(), 1);
        assert_eq!(k.live_hashes().unwrap(), a.hashes());
        assert!(k.verify(&a).unwrap().is_clean());
        let out = ns.exec(&[ipt, "-S", "OUTPUT"]).unwrap();
        assert!(out.contains("-A OUTPUT -j DOG-OUTPUT"));
    }
}

/// An agent killed while `ipset restore` filled a temporary set leaves it behind; the restarted
/// agent finds the rules and sets it applied intact, so only drift can notice the leftover.
#[test]
fn a_leftover_temporary_set_is_drift_and_the_repair_removes_it() {
    if !netns::available("a_leftover_temporary_set_is_drift_and_the_repair_removes_it") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        let a = fw1();
        kernel(&ns, backend).apply(&a).unwrap();
        let tmp = dog_agent::core::sets::temp_name("dogz4-web");
        ns.exec(&["ipset", "create", &tmp, "hash:net", "family", "inet"])
            .unwrap();
        ns.exec(&["ipset", "add", &tmp, "192.0.2.1"]).unwrap();

        let k = kernel(&ns, backend); // a restarted agent: no cache
        let d = k.verify(&a).unwrap();
        assert!(
            !d.is_clean(),
            "{backend:?}: a partial temporary set must be seen"
        );
        assert!(
            d.sets.iter().any(|s| s.name == tmp && s.extra_set),
            "{:?}",
            d.lines()
        );
        let r = k.repair(&a).unwrap();
        assert_eq!(r.plan.sets.stale_temps, vec![tmp.clone()]);
        assert!(!dog_sets(&ns).contains(&tmp), "{:?}", dog_sets(&ns));
        assert!(k.verify(&a).unwrap().is_clean());
    }
}

#[test]
fn observe_plans_without_touching_and_deltas_apply() {
    if !netns::available("observe_plans_without_touching_and_deltas_apply") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let k = kernel(&ns, BackendChoice::Nft);
    let a = fw1();
    let p = k.plan(&a).unwrap();
    assert_eq!(p.sets.create.len(), 4);
    assert!(p.rules.v4.restore.is_some());
    assert_eq!(p.rules.v4.fix_jumps.len(), 2);
    k.apply(&a).unwrap();
    let before = full_state(&ns);
    let p = k.plan(&fw2()).unwrap();
    assert_eq!(p.sets.swap, vec!["dogz4-big"]);
    assert_eq!(p.sets.destroy, vec!["dogz4-old"]);
    let prof = p
        .rules
        .v4
        .chains
        .iter()
        .find(|c| c.chain == "DOG-PROFILE")
        .unwrap();
    assert_eq!(
        prof.missing,
        vec!["-A DOG-PROFILE -p tcp -m set --match-set dogz4-web src -m tcp --dport 443 -j ACCEPT"]
    );
    assert_eq!(prof.extra.len(), 2);
    assert!(p.rules.v6.chains.is_empty());
    assert_eq!(full_state(&ns), before, "observe mode reads only");

    // operator deltas on top of the applied firewall
    let deltas = vec![SetDelta {
        name: "dogz4-web".into(),
        add: vec!["198.18.9.0/24".parse().unwrap()],
        remove: vec!["198.18.2.5/32".parse().unwrap()],
    }];
    let (next, r) = k.apply_set_deltas(&a, &deltas).unwrap();
    assert_eq!(r.plan.sets.delta, deltas);
    assert!(r.plan.rules.v4.restore.is_none());
    assert_eq!(
        next.sets["dogz4-web"].members,
        vec![
            "198.18.1.0/24".parse().unwrap(),
            "198.18.9.0/24".parse().unwrap()
        ]
    );
    assert_eq!(
        kernel(&ns, BackendChoice::Nft).live_hashes().unwrap(),
        next.hashes()
    );
    let unknown = SetDelta {
        name: "dogz4-none".into(),
        ..Default::default()
    };
    assert!(matches!(
        k.apply_set_deltas(&next, &[unknown]),
        Err(ApplyError::UnknownSet(_))
    ));
}

#[test]
fn remove_all_leaves_nothing_of_dog() {
    if !netns::available("remove_all_leaves_nothing_of_dog") {
        return;
    }
    for backend in BACKENDS {
        let ns = NetNs::new().unwrap();
        let empty = full_state(&ns);
        let k = kernel(&ns, backend);
        k.apply(&fw1()).unwrap();
        assert_ne!(full_state(&ns), empty);
        let r = k.remove_all().unwrap();
        assert_eq!(r.sets.len(), 4);
        assert!(r.chains_v4.contains(&"DOG-PROFILE".to_string()));
        assert_eq!(full_state(&ns), empty, "{backend:?}");
        assert!(k.remove_all().unwrap().sets.is_empty());
    }
}

#[test]
fn backend_is_detected_like_kube_proxy() {
    if !netns::available("backend_is_detected_like_kube_proxy") {
        return;
    }
    let auto = |ns: &NetNs| {
        Applier::new(KernelConfig {
            netns: Some(ns.name().into()),
            ..Default::default()
        })
        .unwrap()
        .backend()
    };
    // The image's plain `iptables-save` (node-agent/image/iptables-wrapper, linked under
    // that name) must show the same backend's tables.
    let links = tempfile::tempdir().unwrap();
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("image/iptables-wrapper");
    for name in ["iptables-save", "ip6tables-save"] {
        std::os::unix::fs::symlink(&wrapper, links.path().join(name)).unwrap();
    }
    let agent_dir = Path::new(env!("CARGO_BIN_EXE_dog-agent")).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        links.path().display(),
        agent_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plain_save = |ns: &NetNs| {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "env",
                "-u",
                "DOG_IPTABLES_BACKEND",
            ])
            .arg(format!("PATH={path}"))
            .args(["iptables-save", "-t", "filter"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let ns = NetNs::new().unwrap();
    assert_eq!(auto(&ns), Backend::Nft, "empty → nft");
    ns.exec(&[
        "iptables-legacy",
        "-w",
        "-A",
        "FORWARD",
        "-s",
        "10.244.0.0/16",
        "-j",
        "ACCEPT",
    ])
    .unwrap();
    assert_eq!(auto(&ns), Backend::Legacy, "more legacy rules");
    let save = plain_save(&ns);
    assert!(
        save.contains("-A FORWARD -s 10.244.0.0/16 -j ACCEPT") && !save.contains("Warning"),
        "plain iptables-save on a legacy node: {save}"
    );
    ns.exec(&[
        "iptables-nft",
        "-w",
        "-t",
        "mangle",
        "-N",
        "KUBE-KUBELET-CANARY",
    ])
    .unwrap();
    assert_eq!(auto(&ns), Backend::Nft, "kubelet canary in nft");
    assert!(
        !plain_save(&ns).contains("10.244.0.0/16"),
        "plain iptables-save on an nft node shows the legacy tables"
    );
}

/// What dog writes through netlink is what the `ipset` tool itself reads back, member for
/// member (a fill spanning many messages, IPv4 and IPv6, every prefix length, then a one-member
/// change), and what the tool wrote dog reads the same through netlink.
#[test]
fn netlink_writes_are_what_the_ipset_tool_reads_back() {
    if !netns::available("netlink_writes_are_what_the_ipset_tool_reads_back") {
        return;
    }
    let ns = NetNs::new().unwrap();
    let k = kernel(&ns, BackendChoice::Nft);
    assert_eq!(k.set_backend(), SetBackend::Netlink);
    let v4: Vec<String> = (0..20_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 4);
            format!("{a}/{}", 24 + (i % 9))
        })
        .collect();
    let v6: Vec<String> = (0..3_000u32)
        .map(|i| format!("fd00:{i:x}::/{}", 32 + (i % 97)))
        .collect();
    let sets = |v4: &[String]| {
        firewall(
            &["-A DOG-INPUT -m set --match-set dogz4-big src -j DROP"],
            &["-A DOG-INPUT -m set --match-set dogz6-big src -j DROP"],
            vec![
                set(
                    "dogz4-big",
                    Family::V4,
                    &v4.iter().map(String::as_str).collect::<Vec<_>>(),
                ),
                set(
                    "dogz6-big",
                    Family::V6,
                    &v6.iter().map(String::as_str).collect::<Vec<_>>(),
                ),
            ],
        )
    };
    let tool_view = || parse_ipset_save(&ns.exec(&["ipset", "save"]).unwrap());
    let fw = sets(&v4);
    k.apply(&fw).unwrap();
    let seen = tool_view();
    for name in ["dogz4-big", "dogz6-big"] {
        assert_eq!(seen[name].members, fw.sets[name].members, "{name}");
        assert!(seen[name].members.len() > 2_000);
    }
    // one member replaced: a strict delete and add, then only the count is read
    let mut changed = v4.clone();
    changed[123] = "192.0.2.0/24".into();
    let fw2 = sets(&changed);
    let r = k.apply(&fw2).unwrap();
    assert_eq!(r.plan.sets.delta.len(), 1);
    assert_eq!(
        tool_view()["dogz4-big"].members,
        fw2.sets["dogz4-big"].members
    );
    // the tool's writes read the same through netlink, and the other way round
    let cli = Applier::new(KernelConfig {
        netns: Some(ns.name().to_string()),
        backend: BackendChoice::Nft,
        sets: SetBackendChoice::Cli,
        broker_port: Some(5672),
        lock_wait_secs: 5,
    })
    .unwrap();
    assert!(cli.verify(&fw2).unwrap().is_clean());
    cli.apply(&fw).unwrap();
    assert!(k.verify(&fw).unwrap().is_clean());
    // a member written behind dog's back is drift, found by the netlink read
    ns.exec(&["ipset", "add", "dogz4-big", "203.0.113.9"])
        .unwrap();
    let drift = k.verify(&fw).unwrap();
    assert_eq!(drift.sets.len(), 1, "{drift:?}");
    assert_eq!(
        drift.sets[0].extra_members,
        vec!["203.0.113.9/32".parse::<ipnet::IpNet>().unwrap()]
    );
}
