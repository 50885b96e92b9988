//! The committed generated files must equal what the code generates now.
//!
//! Fix a failure with the command in `dog_operator::crdgen::REGENERATE_COMMAND`:
//! `cargo run -p dog-operator -- crdgen --dir crds --dir charts/dog/crds --reference docs/reference.md`

use dog_operator::crdgen::{crd_files, reference_markdown, REGENERATE_COMMAND};
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}; run `{REGENERATE_COMMAND}`", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    names
}

fn assert_dir_matches(dir: &Path) {
    let expected = crd_files();
    let mut expected_names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    expected_names.sort();
    assert_eq!(
        yaml_files(dir),
        expected_names,
        "{} holds other files than the generated CRDs; run `{REGENERATE_COMMAND}` and remove extras",
        dir.display()
    );
    for (name, content) in expected {
        let path = dir.join(&name);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            committed == content,
            "{} is stale (operator/src/crd.rs changed); run `{REGENERATE_COMMAND}`",
            path.display()
        );
    }
}

#[test]
fn committed_crds_are_up_to_date() {
    assert_dir_matches(&repo_root().join("crds"));
}

#[test]
fn chart_crds_are_identical_to_top_level_crds() {
    assert_dir_matches(&repo_root().join("charts/dog/crds"));
}

#[test]
fn committed_reference_is_up_to_date() {
    let path = repo_root().join("docs/reference.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; run `{REGENERATE_COMMAND}`",
            path.display()
        )
    });
    assert!(
        committed == reference_markdown(),
        "{} is stale; run `{REGENERATE_COMMAND}`",
        path.display()
    );
}
