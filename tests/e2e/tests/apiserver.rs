//! The CRDs against a real kube-apiserver: what admission refuses (with the field in the
//! message), what it accepts, server-side apply from several field managers, and the README's
//! cluster commands as written.

use dog_kube_harness::{exclusive, repo_root, shared, unique};
use serde_json::Value;
use std::collections::BTreeSet;

fn fixtures(file: &str) -> Vec<serde_yaml::Value> {
    let path = repo_root().join("tests/fixtures/admission").join(file);
    let text = std::fs::read_to_string(&path).expect("fixture file");
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The object as YAML text with a unique name and the dog API version.
fn manifest(object: &serde_yaml::Value) -> (String, String) {
    let name = unique("adm");
    let mut object = object.clone();
    if let serde_yaml::Value::Mapping(m) = &mut object {
        m.insert("apiVersion".into(), "dogfw.io/v1alpha1".into());
    }
    let text = serde_yaml::to_string(&object)
        .expect("yaml")
        .replace("{n}", &name);
    (name, text)
}

fn dry_run(yaml: &str) -> Result<String, String> {
    shared().apply(yaml, &["--dry-run=server"])
}

/// Every `message` of an `x-kubernetes-validations` rule in crds/.
fn cel_messages() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    for r in rules {
                        if let Some(msg) = r.get("message").and_then(Value::as_str) {
                            out.insert(msg.to_string());
                        }
                    }
                }
                m.values().for_each(|c| walk(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(repo_root().join("crds")).expect("crds/") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("crd");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("crd yaml");
            walk(&v, &mut out);
        }
    }
    out
}

#[test]
fn invalid_objects_are_refused_at_admission_naming_the_field() {
    let cases = fixtures("refused.yaml");
    assert!(cases.len() >= 20, "expected the refused fixtures");
    let mut failures = Vec::new();
    let mut covered = BTreeSet::new();
    for case in &cases {
        let expect: Vec<String> = serde_yaml::from_value(case["expect"].clone()).expect("expect");
        let (_, yaml) = manifest(&case["object"]);
        match dry_run(&yaml) {
            Ok(out) => failures.push(format!("accepted ({}):\n{yaml}", out.trim())),
            Err(err) => {
                let missing: Vec<&String> = expect
                    .iter()
                    .filter(|e| !err.contains(e.as_str()))
                    .collect();
                if !missing.is_empty() {
                    failures.push(format!(
                        "refused without {missing:?}:\n{yaml}the server said: {err}"
                    ));
                }
                covered.extend(expect);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    let untested: Vec<String> = cel_messages()
        .into_iter()
        .filter(|m| !covered.iter().any(|e| m.contains(e.as_str())))
        .collect();
    assert!(
        untested.is_empty(),
        "CEL rules no refused fixture breaks: {untested:?}"
    );
}

#[test]
fn edge_cases_next_to_the_refused_ones_are_accepted() {
    let mut failures = Vec::new();
    for object in fixtures("accepted.yaml") {
        let (_, yaml) = manifest(&object);
        if let Err(e) = dry_run(&yaml) {
            failures.push(format!("{yaml}the server said: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn identical_manifests_apply_from_any_field_manager() {
    // Rules that leave out every field that has a default: the server must store them as sent,
    // or a second manager of the same manifest conflicts on the whole (atomic) list.
    let name = unique("ssa");
    let yaml = format!(
        "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {{name: {name}}}\nspec:\n  inbound:\n    - {{action: ACCEPT, protocol: tcp, ports: [\"22\"]}}\n    - {{action: ACCEPT, peer: {{kind: Group, name: web}}}}\n  outbound:\n    - {{action: LOG}}\n---\napiVersion: dogfw.io/v1alpha1\nkind: Group\nmetadata: {{name: {name}}}\nspec:\n  profile: {name}\n  selector:\n    matchExpressions: [{{key: role, operator: In, values: [db]}}]\n---\napiVersion: dogfw.io/v1alpha1\nkind: Zone\nmetadata: {{name: {name}}}\nspec: {{addresses: [\"10.0.0.0/8\"]}}\n"
    );
    let _only = exclusive();
    let s = shared();
    let steps: [&[&str]; 4] = [
        &[],
        &["--server-side"],
        &["--server-side", "--field-manager", "gitops-a"],
        &["--server-side", "--field-manager", "gitops-b"],
    ];
    for extra in steps {
        if let Err(e) = s.apply(&yaml, extra) {
            panic!("kubectl apply {extra:?} of the same manifest failed: {e}");
        }
    }
    // and the operator's own defaults are still what it reads
    let stored = s
        .get_json("profiles.dogfw.io", &name, None)
        .expect("profile");
    let rule: dog_operator::crd::Rule =
        serde_json::from_value(stored["spec"]["inbound"][1].clone()).expect("rule");
    assert!(rule.enabled);
    assert_eq!(rule.protocol, dog_operator::crd::Protocol::Any);
    for kind in ["profiles.dogfw.io", "groups.dogfw.io", "zones.dogfw.io"] {
        s.kubectl_ok(&["delete", kind, &name]);
    }
}

/// The README's cluster block (`kubectl …` lines after "In a cluster"), run as written from the
/// repository root (the caller holds `exclusive`).
fn readme_cluster_block() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let block: Vec<&str> = readme
        .split("In a cluster the same objects are Kubernetes resources:")
        .nth(1)
        .and_then(|rest| rest.split("```sh").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the README's cluster block")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(block.len() >= 3, "{block:?}");
    let s = shared();
    for line in &block {
        let args: Vec<&str> = line
            .strip_prefix("kubectl ")
            .unwrap_or_else(|| panic!("not a kubectl command: {line}"))
            .split_whitespace()
            .collect();
        let out = s.kubectl_as(&s.kubeconfig, &args, None);
        assert!(
            out.status.success(),
            "`{line}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args.first() == Some(&"get") {
            let text = String::from_utf8_lossy(&out.stdout);
            for name in [
                "group.dogfw.io/db",
                "profile.dogfw.io/db",
                "zone.dogfw.io/office",
            ] {
                assert!(text.contains(name), "`{line}` lacks {name}:\n{text}");
            }
        }
    }
    // the dog objects only: this server runs no namespace controller to finish a deletion
    s.kubectl_ok(&[
        "delete",
        "groups.dogfw.io,profiles.dogfw.io,zones.dogfw.io,hosts.dogfw.io",
        "--all",
    ]);
}

/// The first `sh` block after `heading` in a Markdown file.
fn sh_block(file: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join(file)).expect("doc");
    text.split(heading)
        .nth(1)
        .and_then(|rest| rest.split("```sh").nth(1))
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("no sh block after {heading:?} in {file}"))
        .to_string()
}

/// Runs a block of shell commands as written, with `kubectl` (of the pinned release, as the
/// admin) and `dog-operator` on PATH, in `dir`.
fn run_block(block: &str, dir: &std::path::Path) {
    let s = shared();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let link = |name: &str, target: std::path::PathBuf| {
        let _ = std::fs::remove_file(bin.join(name));
        std::os::unix::fs::symlink(target, bin.join(name)).expect("symlink");
    };
    link("kubectl", dog_kube_harness::binary("kubectl"));
    link("dog-operator", dog_e2e::bin("dog-operator"));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(dir)
        .env("PATH", path)
        .env("KUBECONFIG", &s.kubeconfig)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "commands failed:\n{block}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The install commands as a new user runs them on an empty cluster: the README's key and
/// Secret commands (the `helm install` line is the chart, which manifests/dog.yaml is, rendered
/// by Helm and checked equal by scripts/check-k8s.sh), then docs/operations.md's "Without Helm"
/// block, then the README's cluster block. Every object must be accepted by the real server.
#[test]
fn readme_and_install_commands_run_as_written() {
    let _only = exclusive();
    let s = shared();
    let work = tempfile::tempdir().expect("tempdir");
    let install = sh_block("README.md", "## Install with Helm");
    let without_helm: String = install
        .split("\nhelm install")
        .next()
        .expect("the README's install block")
        .to_string();
    assert!(
        without_helm.contains("kubectl create namespace dog-system"),
        "{install}"
    );
    run_block(&without_helm, work.path());
    run_block(
        &format!(
            "cd {}\n{}",
            repo_root().display(),
            sh_block("docs/operations.md", "### Without Helm")
        ),
        work.path(),
    );
    for (kind, name) in [
        ("deployment", "dog-operator"),
        ("daemonset", "dog-agent"),
        ("secret", "dog-broker"),
        ("secret", "dog-operator-key"),
        ("configmap", "dog-operator-public-keys"),
    ] {
        assert!(
            s.get_json(kind, name, Some("dog-system")).is_some(),
            "{kind}/{name} missing after the install commands"
        );
    }
    readme_cluster_block();
}

/// A typo such as `prots:` must never reach the operator as a wider rule. The server refuses
/// unknown fields when the client asks for strict validation (kubectl's default, client-side
/// and server-side apply); a client that asks only for a warning gets one, and the field is
/// pruned before the operator sees the object (docs/operations.md, "Unknown fields").
#[test]
fn unknown_fields_are_refused_by_strict_validation_and_pruned_with_a_warning_otherwise() {
    let name = unique("typo");
    let yaml = format!(
        "apiVersion: dogfw.io/v1alpha1\nkind: Profile\nmetadata: {{name: {name}}}\nspec:\n  inbound:\n    - {{action: ACCEPT, protocol: tcp, prots: [\"7000\"]}}\n"
    );
    let _only = exclusive();
    let s = shared();
    for extra in [&[][..], &["--server-side"][..]] {
        let err = s
            .apply(&yaml, extra)
            .expect_err("a Profile with an unknown field must be refused");
        // client-side apply: `unknown field "spec.inbound[0].prots"`; server-side apply:
        // `.spec.inbound[0].prots: field not declared in schema`
        assert!(
            err.contains("unknown field \"spec.inbound[0].prots\"")
                || err.contains(".spec.inbound[0].prots: field not declared in schema"),
            "kubectl apply {extra:?}: {err}"
        );
        assert!(s.get_json("profiles.dogfw.io", &name, None).is_none());
    }
    let out = s.kubectl_as(
        &s.kubeconfig,
        &["apply", "--validate=warn", "-f", "-"],
        Some(&yaml),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("unknown field \"spec.inbound[0].prots\""),
        "the client is warned: {stderr}"
    );
    let stored = s
        .get_json("profiles.dogfw.io", &name, None)
        .expect("stored with a warning");
    assert!(stored["spec"]["inbound"][0].get("prots").is_none());
    s.kubectl_ok(&["delete", "profiles.dogfw.io", &name]);
}
