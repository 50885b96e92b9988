//! Every invalid object under `tests/fixtures/invalid/` (each file's first line says what it
//! expects: `# expect: Kind name field [Reason]`) produces a status condition naming the field,
//! the hosts that ran the broken object keep their last rules (withheld, never a wider or
//! partial ruleset), and every other host's output is unaffected.

use dog_operator::core::compile::{compile, CompileOptions, HostOutcome, ObjectKind};
use dog_operator::core::report;
use dog_operator::dir::load::{load_dir, load_text};
use std::collections::BTreeMap;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn every_invalid_fixture_is_reported_on_its_field_and_harms_no_other_host() {
    let (base, errors) = load_dir(&root().join("examples/demo")).expect("demo fleet loads");
    assert!(errors.is_empty(), "{errors:?}");
    let opts = CompileOptions::default();
    let baseline = compile(&base, &opts);
    let dir = root().join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the invalid fixtures in {}",
        dir.display()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `# expect: Kind name field [Reason]`",
                    file.display()
                )
            });
        let words: Vec<&str> = expect.split_whitespace().collect();
        let (kind, name, field, reason) = (words[0], words[1], words[2], words.get(3).copied());
        let mut snap = base.clone();
        let mut load_errors = Vec::new();
        load_text(&file, &text, &mut snap, &mut load_errors);
        assert!(
            load_errors.is_empty(),
            "{}: {load_errors:?}",
            file.display()
        );
        let out = compile(&snap, &opts);

        let kind_enum = match kind {
            "Profile" => ObjectKind::Profile,
            "Zone" => ObjectKind::Zone,
            "Group" => ObjectKind::Group,
            "Host" => ObjectKind::Host,
            other => panic!("unknown kind {other}"),
        };
        let diags = out.diagnostics_for(kind_enum, name);
        assert!(
            diags
                .iter()
                .any(|d| d.field.starts_with(field) && reason.is_none_or(|r| d.reason == r)),
            "{}: expected a diagnostic on {kind} {name} field {field} ({reason:?}), got {diags:#?}",
            file.display()
        );

        // the status condition names the field
        let views = BTreeMap::new();
        let conditions = match kind {
            "Profile" => report::profile_status(&out, name, &views).conditions,
            "Zone" => report::zone_status(&out, name).conditions,
            "Group" => report::group_status(&out, name, &views).conditions,
            _ => unreachable!(),
        };
        let valid = conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .expect("a Valid condition");
        assert_eq!(valid.status, "False", "{}: {valid:?}", file.display());
        assert!(
            valid.message.contains(field),
            "{}: condition message should name {field}: {valid:?}",
            file.display()
        );

        // hosts: unaffected, or withheld (keeping their last rules); never a different ruleset
        for (host, before) in &baseline.hosts {
            let after = &out.hosts[host];
            match (before, after) {
                (_, HostOutcome::Withheld { .. }) => {}
                (
                    HostOutcome::Firewall { firewall: a, .. },
                    HostOutcome::Firewall { firewall: b, .. },
                ) => {
                    if kind == "Zone" {
                        // an invalid zone entry is dropped from the set; rules stay the same
                        assert_eq!(
                            (&a.ipv4, &a.ipv6),
                            (&b.ipv4, &b.ipv6),
                            "{}: {host}",
                            file.display()
                        );
                    } else {
                        assert_eq!(
                            a.hashes,
                            b.hashes,
                            "{}: host {host} changed",
                            file.display()
                        );
                    }
                }
                (b, a) => {
                    // a group whose profile vanished leaves its hosts unmanaged (nothing sent)
                    assert!(
                        matches!(a, HostOutcome::Unmanaged) && kind == "Group",
                        "{}: host {host} went from {b:?} to {a:?}",
                        file.display()
                    );
                }
            }
        }
    }
}
