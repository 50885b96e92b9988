//! `compile --diff` names rules by identity, not position: removing one rule shows that rule's
//! lines and nothing else, named or not, and the summary line counts what changed.

use dog_operator::core::compile::{compile, CompileOptions, Snapshot};
use dog_operator::core::preview::host_diff;
use dog_operator::dir::load::load_dir;
use std::path::Path;

fn fleet() -> Snapshot {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    let (snap, errors) = load_dir(&dir).unwrap();
    assert!(errors.is_empty());
    snap
}

/// The changed rule lines of a diff: (removed, added).
fn rule_changes(diff: &str) -> (Vec<&str>, Vec<&str>) {
    let rules: Vec<&str> = diff
        .lines()
        .take_while(|l| *l != "# sets")
        .filter(|l| {
            l.starts_with("-A")
                || l.starts_with("+A")
                || l.starts_with("--A")
                || l.starts_with("+-A")
        })
        .collect();
    let removed = rules
        .iter()
        .copied()
        .filter(|l| l.starts_with('-'))
        .collect();
    let added = rules
        .iter()
        .copied()
        .filter(|l| l.starts_with('+'))
        .collect();
    (removed, added)
}

fn removing_second_inbound_rule_of_db(strip_names: bool) -> String {
    let mut old = fleet();
    if strip_names {
        for rule in &mut std::sync::Arc::make_mut(old.profiles.get_mut("db").unwrap())
            .spec
            .inbound
        {
            rule.name = None;
        }
    }
    let mut new = old.clone();
    std::sync::Arc::make_mut(new.profiles.get_mut("db").unwrap())
        .spec
        .inbound
        .remove(1);
    let options = CompileOptions::default();
    host_diff(&compile(&old, &options), &compile(&new, &options), "db-1")
}

#[test]
fn removing_one_named_rule_shows_only_its_lines() {
    let diff = removing_second_inbound_rule_of_db(false);
    let (removed, added) = rule_changes(&diff);
    assert_eq!(removed.len(), 2, "one line per family:\n{diff}");
    assert!(added.is_empty(), "nothing else moves:\n{diff}");
    assert!(
        removed.iter().all(|l| l.contains("dog:db:in:pg-cap")),
        "{diff}"
    );
    assert!(
        diff.starts_with("# host db-1: IPv4 rules -1 +0; IPv6 rules -1 +0; sets +0 -0, members +0 -0 in 0 set(s)\n"),
        "{diff}"
    );
}

#[test]
fn removing_one_unnamed_rule_shows_only_its_lines() {
    let diff = removing_second_inbound_rule_of_db(true);
    let (removed, added) = rule_changes(&diff);
    assert_eq!(removed.len(), 2, "one line per family:\n{diff}");
    assert!(added.is_empty(), "nothing else moves:\n{diff}");
    assert!(
        removed.iter().all(|l| l.contains("--connlimit-above 50")),
        "{diff}"
    );
}
