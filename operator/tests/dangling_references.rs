//! A Zone or Group that a Profile names disappears: each rule fails closed on its own, the rest
//! of the profile keeps applying, and status names the degraded rule.
//!
//! - an ACCEPT or LOG rule whose peer is missing matches nothing (it is not rendered);
//! - a DROP or REJECT rule whose peer is missing keeps the peer's last known members;
//! - a DROP or REJECT rule whose peer the compiler never saw (e.g. after a restart) withholds
//!   the profile: the hosts keep what they run, nothing opens.

use dog_operator::core::compile::setname::{set_name, SetSource};
use dog_operator::core::compile::{
    CompileOptions, Compiled, Compiler, HostOutcome, ObjectKind, Severity, Snapshot,
};
use dog_operator::core::report::{profile_status, HostView};
use dog_operator::dir::load::load_dir;
use dog_protocol::ruleset::Family;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn fleet() -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    let (snap, errors) = load_dir(&dir).unwrap();
    assert!(errors.is_empty());
    snap
}

fn rules(c: &Compiled, host: &str, family: Family) -> String {
    match c.hosts.get(host) {
        Some(HostOutcome::Firewall { firewall, .. }) => firewall.document(family).text.clone(),
        other => panic!("{host} runs no firewall: {other:?}"),
    }
}

fn set_members(c: &Compiled, host: &str, set: &str) -> Vec<String> {
    match c.hosts.get(host) {
        Some(HostOutcome::Firewall { firewall, .. }) => firewall
            .sets
            .get(set)
            .unwrap_or_else(|| panic!("{host} has no set {set}"))
            .members
            .iter()
            .map(|m| m.to_string())
            .collect(),
        other => panic!("{host} runs no firewall: {other:?}"),
    }
}

fn degraded_condition(c: &Compiled, profile: &str) -> (String, String) {
    let st = profile_status(c, profile, &BTreeMap::<String, HostView>::new());
    let d = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("a Degraded condition");
    (d.status.clone(), d.message.clone())
}

#[test]
fn a_deleted_zone_closes_its_accept_rule_and_the_rest_of_the_profile_still_applies() {
    let mut c = Compiler::new(CompileOptions::default());
    c.load(fleet());
    assert!(rules(c.compiled(), "db-1", Family::V4).contains("dog:db:in:pg-office"));

    let mut snap = fleet();
    snap.zones.remove("office");
    c.update(snap.clone());
    let out = c.compiled();
    let v4 = rules(out, "db-1", Family::V4);
    assert!(
        !v4.contains("pg-office"),
        "the ACCEPT rule naming the deleted zone must match nothing:\n{v4}"
    );
    assert!(v4.contains("pg-web"), "other rules keep applying:\n{v4}");
    let d = out.diagnostics_for(ObjectKind::Profile, "db");
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].field, "spec.inbound[3].peer.name");
    assert_eq!(d[0].reason, "DanglingReference");
    assert_eq!(d[0].severity, Severity::Warning);
    assert!(d[0].message.contains("matches nothing"), "{}", d[0].message);
    let (status, message) = degraded_condition(out, "db");
    assert_eq!(status, "True");
    assert!(message.contains("spec.inbound[3]"), "{message}");
    assert!(out.profiles["db"].valid);

    // a rule deleted afterwards is gone at once: the profile is not frozen
    let mut edited = snap.clone();
    Arc::make_mut(edited.profiles.get_mut("db").unwrap())
        .spec
        .inbound
        .remove(2);
    c.update(edited);
    let v4 = rules(c.compiled(), "db-1", Family::V4);
    assert!(!v4.contains("pg-web"), "{v4}");
}

#[test]
fn a_deleted_blocklist_keeps_blocking_its_last_members() {
    let mut c = Compiler::new(CompileOptions::default());
    c.load(fleet());
    let blocklist = set_name(SetSource::Zone, "blocklist", Family::V4);
    let before = set_members(c.compiled(), "web-1", &blocklist);
    assert!(!before.is_empty());

    let mut snap = fleet();
    snap.zones.remove("blocklist");
    c.update(snap.clone());
    let out = c.compiled();
    let v4 = rules(out, "web-1", Family::V4);
    assert!(v4.contains(&format!("--match-set {blocklist} src")), "{v4}");
    assert_eq!(set_members(out, "web-1", &blocklist), before);
    let d = out.diagnostics_for(ObjectKind::Profile, "web");
    assert!(
        d.iter().any(|d| d.field == "spec.inbound[0].peer.name"
            && d.severity == Severity::Warning
            && d.message.contains("last known")),
        "{d:?}"
    );
    assert_eq!(degraded_condition(out, "web").0, "True");

    // later unrelated changes keep the remembered members
    let mut relabel = snap.clone();
    Arc::make_mut(relabel.hosts.get_mut("web-2").unwrap())
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("site".into(), "fra".into());
    c.update(relabel);
    assert_eq!(set_members(c.compiled(), "web-1", &blocklist), before);

    // the zone comes back with other content: that content is used
    let mut back = fleet();
    Arc::make_mut(back.zones.get_mut("blocklist").unwrap())
        .spec
        .addresses = vec!["192.0.2.99".into()];
    Arc::make_mut(back.zones.get_mut("blocklist").unwrap())
        .spec
        .config_map_refs
        .clear();
    c.update(back);
    assert_eq!(
        set_members(c.compiled(), "web-1", &blocklist),
        vec!["192.0.2.99/32".to_string()]
    );
    assert_eq!(degraded_condition(c.compiled(), "web").0, "False");
}

#[test]
fn a_drop_rule_whose_peer_was_never_seen_withholds_the_profile() {
    let mut snap = fleet();
    snap.zones.remove("blocklist");
    let mut c = Compiler::new(CompileOptions::default());
    c.load(snap);
    let out = c.compiled();
    assert!(matches!(out.hosts["web-1"], HostOutcome::Withheld { .. }));
    let d = out.diagnostics_for(ObjectKind::Profile, "web");
    assert!(
        d.iter()
            .any(|d| d.severity == Severity::Error && d.reason == "DanglingReference"),
        "{d:?}"
    );
}

#[test]
fn a_deleted_group_closes_accept_and_log_rules() {
    let mut snap = fleet();
    Arc::make_mut(snap.profiles.get_mut("db").unwrap())
        .spec
        .inbound
        .push(serde_yaml::from_str("{action: LOG, peer: {kind: Group, name: web}}").unwrap());
    let mut c = Compiler::new(CompileOptions::default());
    c.load(snap.clone());
    let web = set_name(SetSource::Group, "web", Family::V4);
    assert!(rules(c.compiled(), "db-1", Family::V4).contains(&web));
    snap.groups.remove("web");
    c.update(snap);
    let out = c.compiled();
    let v4 = rules(out, "db-1", Family::V4);
    // pg-web (ACCEPT) and the LOG rule are gone; pg-cap (REJECT) keeps the last members
    assert!(!v4.contains("pg-web") && !v4.contains(":in:6"), "{v4}");
    assert!(v4.contains("pg-cap"), "{v4}");
    assert!(!set_members(out, "db-1", &web).is_empty());
}
