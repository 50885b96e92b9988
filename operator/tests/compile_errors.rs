//! Compiler behaviour on bad input, determinism, and incremental == full compile.

use dog_operator::core::compile::setname::{set_name, SetSource};
use dog_operator::core::compile::{
    compile, CompileOptions, Compiler, Edit, HostOutcome, ObjectKind, Snapshot,
};
use dog_operator::crd::{Profile, Zone};
use dog_operator::dir::load::load_dir;
use dog_protocol::ruleset::Family;
use std::path::Path;
use std::sync::Arc;

fn fleet() -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    let (snap, errors) = load_dir(&dir).unwrap();
    assert!(errors.is_empty());
    snap
}

fn profile(yaml: &str) -> Arc<Profile> {
    Arc::new(serde_yaml::from_str(yaml).unwrap())
}

fn is_fw(o: Option<&HostOutcome>) -> bool {
    matches!(o, Some(HostOutcome::Firewall { .. }))
}

#[test]
fn an_unknown_blocklist_withholds_only_that_profiles_hosts() {
    // a DROP rule naming a zone this compiler never saw: withheld (nothing opens); the
    // ACCEPT-side cases are in dangling_references.rs
    let mut snap = fleet();
    snap.profiles.insert(
        "db".into(),
        profile(
            "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {name: db}\nspec:\n  inbound:\n    - {action: ACCEPT, protocol: tcp, ports: ['5432']}\n    - {action: DROP, peer: {kind: Zone, name: nowhere}, protocol: tcp, ports: ['5432']}\n",
        ),
    );
    let c = compile(&snap, &CompileOptions::default());
    assert_eq!(
        c.hosts["db-1"],
        HostOutcome::Withheld {
            group: "db".into(),
            profile: "db".into()
        }
    );
    for h in ["web-1", "web-2", "bastion-1"] {
        assert!(is_fw(c.hosts.get(h)), "{h}");
    }
    let d = c.diagnostics_for(ObjectKind::Profile, "db");
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].field, "spec.inbound[1].peer.name");
    assert_eq!(d[0].reason, "DanglingReference");
    assert!(!c.profiles["db"].valid);
}

#[test]
fn bad_ports_and_protocol_mismatches_are_reported_per_field() {
    let mut snap = fleet();
    snap.profiles.insert(
        "web".into(),
        profile(
            "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {name: web}\nspec:\n  inbound:\n    - {action: ACCEPT, protocol: tcp, ports: ['80', '70000']}\n    - {action: ACCEPT, protocol: tcp, ports: ['90-80']}\n    - {action: ACCEPT, ports: ['22']}\n    - {action: DROP, protocol: icmp, peer: {kind: Cidrs, cidrs: ['2001:db8::/32']}}\n    - {action: ACCEPT, peer: {kind: Group}}\n    - {action: ACCEPT, protocol: tcp, type: connlimit}\n",
        ),
    );
    let c = compile(&snap, &CompileOptions::default());
    assert!(matches!(c.hosts["web-1"], HostOutcome::Withheld { .. }));
    assert!(matches!(c.hosts["web-2"], HostOutcome::Withheld { .. }));
    assert!(is_fw(c.hosts.get("db-1")));
    let got: Vec<(String, String)> = c
        .diagnostics_for(ObjectKind::Profile, "web")
        .iter()
        .map(|d| (d.field.clone(), d.reason.to_string()))
        .collect();
    let want = [
        ("spec.inbound[0].ports[1]", "InvalidPort"),
        ("spec.inbound[1].ports[0]", "InvalidPort"),
        ("spec.inbound[2].ports", "InvalidPort"),
        ("spec.inbound[3]", "NoFamily"),
        ("spec.inbound[4].peer.name", "MissingField"),
        ("spec.inbound[5].connlimit", "MissingField"),
    ];
    for (f, r) in want {
        assert!(
            got.contains(&(f.to_string(), r.to_string())),
            "missing {f} {r} in {got:?}"
        );
    }
}

#[test]
fn invalid_zone_entries_are_dropped_and_counted() {
    let mut snap = fleet();
    let mut z: Zone = (*snap.zones["office"]).clone();
    z.spec.addresses.push("203.0.113.300".into());
    z.spec.addresses.push("not-an-address".into());
    snap.zones.insert("office".into(), Arc::new(z));
    let c = compile(&snap, &CompileOptions::default());
    for h in ["web-1", "db-1", "bastion-1"] {
        assert!(is_fw(c.hosts.get(h)), "{h}");
    }
    let s = &c.zones["office"];
    assert_eq!(s.invalid_count, 2);
    assert_eq!(s.ipv4_count, 2);
    assert_eq!(s.ipv6_count, 1);
    let d = c.diagnostics_for(ObjectKind::Zone, "office");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].field, "spec.addresses[3]");
    assert_eq!(d[0].reason, "InvalidAddress");
}

#[test]
fn conflicting_groups_keep_last_rules_and_say_so() {
    let mut snap = fleet();
    let mut h = (*snap.hosts["web-1"]).clone();
    h.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("role".into(), "web".into());
    let mut g = (*snap.groups["db"]).clone();
    g.spec.hosts.push("web-1".into());
    snap.groups.insert("db".into(), Arc::new(g));
    snap.hosts.insert("web-1".into(), Arc::new(h));
    let c = compile(&snap, &CompileOptions::default());
    assert_eq!(
        c.hosts["web-1"],
        HostOutcome::Conflict {
            groups: vec!["db".into(), "web".into()]
        }
    );
    assert!(is_fw(c.hosts.get("web-2")));
    let d = c.diagnostics_for(ObjectKind::Host, "web-1");
    assert_eq!(d[0].reason, "Conflict");
    // still a member for address sets
    assert_eq!(c.groups["web"].ipv4_addresses, 2);
}

#[test]
fn output_is_deterministic() {
    let snap = fleet();
    let a = compile(&snap, &CompileOptions::default());
    let b = compile(&snap, &CompileOptions::default());
    for (h, o) in &a.hosts {
        let (HostOutcome::Firewall { firewall: x, .. }, HostOutcome::Firewall { firewall: y, .. }) =
            (o, &b.hosts[h])
        else {
            panic!()
        };
        assert_eq!(x.ipv4.text, y.ipv4.text);
        assert_eq!(x.ipv6.text, y.ipv6.text);
        assert_eq!(x.hashes, y.hashes);
    }
    assert_eq!(a.set_hashes, b.set_hashes);
    // hosts of one group share one rendered firewall
    let (HostOutcome::Firewall { firewall: w1, .. }, HostOutcome::Firewall { firewall: w2, .. }) =
        (&a.hosts["web-1"], &a.hosts["web-2"])
    else {
        panic!()
    };
    assert!(std::sync::Arc::ptr_eq(w1, w2));
}

#[test]
fn zone_entry_change_is_incremental_and_equals_full_compile() {
    let snap = fleet();
    let mut c = Compiler::new(CompileOptions::default());
    c.load(snap.clone());
    let before = c.compiled().clone();
    let mut z = (*snap.zones["office"]).clone();
    z.spec.addresses.push("203.0.113.99".into());
    let z = Arc::new(z);
    let changes = c.apply([Edit::Zone("office".into(), Some(z.clone()))]);
    assert!(!changes.full);
    // office is used by db and bastion: their hosts change, web's do not
    assert_eq!(
        changes.hosts.iter().cloned().collect::<Vec<_>>(),
        vec!["bastion-1".to_string(), "db-1".to_string()]
    );
    // only the IPv4 set changed (an IPv4 entry was added), and the change is known member by
    // member, against the content the hosts hold
    let v4 = set_name(SetSource::Zone, "office", Family::V4);
    assert_eq!(changes.sets.iter().collect::<Vec<_>>(), vec![&v4]);
    let diff = &changes.set_diffs[&v4];
    assert_eq!(diff.add, vec!["203.0.113.99/32".parse().unwrap()]);
    assert!(diff.remove.is_empty());
    assert_eq!(diff.base_hash, before.set_hashes[&v4]);
    assert_eq!(diff.hash, c.compiled().set_hashes[&v4]);
    let mut snap2 = snap.clone();
    snap2.zones.insert("office".into(), z);
    let full = compile(&snap2, &CompileOptions::default());
    let inc = c.compiled();
    assert_eq!(inc.hosts, full.hosts);
    assert_eq!(inc.sets, full.sets);
    assert_eq!(inc.set_hashes, full.set_hashes);
    assert_eq!(inc.diagnostics, full.diagnostics);
    assert_eq!(inc.zones, full.zones);
    // no rule re-rendered: the documents are the very same allocations
    for h in ["db-1", "bastion-1"] {
        let (HostOutcome::Firewall { firewall: a, .. }, HostOutcome::Firewall { firewall: b, .. }) =
            (&before.hosts[h], &inc.hosts[h])
        else {
            panic!()
        };
        assert!(std::sync::Arc::ptr_eq(&a.ipv4, &b.ipv4));
        assert_ne!(a.hashes.sets, b.hashes.sets);
        assert_eq!(a.hashes.ipv4_rules, b.hashes.ipv4_rules);
    }
    // a profile change re-renders that profile only and reports only affected hosts
    let mut p = (*snap.profiles["web"]).clone();
    p.spec.inbound.pop();
    let ch = c.apply([Edit::Profile("web".into(), Some(Arc::new(p)))]);
    assert!(!ch.full);
    assert_eq!(ch.hosts.len(), 2);
    assert!(ch.sets.is_empty());
}

#[test]
fn update_takes_the_fast_path_for_zone_and_config_map_changes_only() {
    let snap = fleet();
    let mut c = Compiler::new(CompileOptions::default());
    assert!(
        c.update(snap.clone()).full,
        "the first update compiles everything"
    );
    assert_eq!(
        c.update(snap.clone()),
        Default::default(),
        "nothing changed"
    );

    // a zone entry and a ConfigMap line change: fast path, equal to a full compile
    let mut snap2 = snap.clone();
    Arc::make_mut(snap2.zones.get_mut("office").unwrap())
        .spec
        .addresses
        .push("203.0.113.99".into());
    let key = snap2.config_map_addresses.keys().next().unwrap().clone();
    let mut lines = (*snap2.config_map_addresses[&key]).clone();
    lines.push("198.51.100.7".into());
    snap2
        .config_map_addresses
        .insert(key, std::sync::Arc::new(lines));
    let changes = c.update(snap2.clone());
    assert!(!changes.full, "{changes:?}");
    assert!(!changes.sets.is_empty());
    let full = compile(&snap2, &CompileOptions::default());
    assert_eq!(c.compiled().hosts, full.hosts);
    assert_eq!(c.compiled().set_hashes, full.set_hashes);

    // a label change is incremental too: web-1 moves from web to db
    let mut snap3 = snap2.clone();
    Arc::make_mut(snap3.hosts.get_mut("web-1").unwrap())
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("role".into(), "db".into());
    let changes = c.update(snap3.clone());
    assert!(!changes.full);
    assert!(changes.hosts.contains("web-1"), "{changes:?}");
    assert_eq!(
        c.compiled().hosts,
        compile(&snap3, &CompileOptions::default()).hosts
    );
}

#[test]
fn entries_with_host_bits_are_applied_as_their_network_and_said_so() {
    let mut snap = fleet();
    Arc::make_mut(snap.zones.get_mut("office").unwrap())
        .spec
        .addresses = vec!["10.91.0.200/24".into()];
    Arc::make_mut(snap.groups.get_mut("web").unwrap())
        .spec
        .extra_addresses = vec!["10.92.0.9/16".into()];
    Arc::make_mut(snap.profiles.get_mut("db").unwrap()).spec.inbound[3] = serde_yaml::from_str(
        "{action: ACCEPT, peer: {kind: Cidrs, cidrs: ['10.93.1.1/8']}, protocol: tcp, ports: ['5432']}",
    )
    .unwrap();
    let c = compile(&snap, &CompileOptions::default());
    let views = std::collections::BTreeMap::new();
    let cases = [
        (
            ObjectKind::Zone,
            "office",
            "spec.addresses[0]",
            "applied as 10.91.0.0/24",
        ),
        (
            ObjectKind::Group,
            "web",
            "spec.extraAddresses[0]",
            "applied as 10.92.0.0/16",
        ),
        (
            ObjectKind::Profile,
            "db",
            "spec.inbound[3].peer.cidrs[0]",
            "applied as 10.0.0.0/8",
        ),
    ];
    for (kind, name, field, says) in cases {
        let d = c.diagnostics_for(kind, name);
        assert!(
            d.iter()
                .any(|d| d.field == field && d.reason == "HostBitsSet" && d.message.contains(says)),
            "{kind:?} {name}: {d:?}"
        );
        let conditions = match kind {
            ObjectKind::Zone => dog_operator::core::report::zone_status(&c, name).conditions,
            ObjectKind::Group => {
                dog_operator::core::report::group_status(&c, name, &views).conditions
            }
            _ => dog_operator::core::report::profile_status(&c, name, &views).conditions,
        };
        let degraded = conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.status, "True", "{kind:?} {name}");
        assert!(degraded.message.contains(says), "{degraded:?}");
        let valid = conditions.iter().find(|c| c.type_ == "Valid").unwrap();
        assert_eq!(valid.status, "True", "a normalized entry is not an error");
    }
    assert!(is_fw(c.hosts.get("db-1")));
}
