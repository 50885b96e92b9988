//! The chart's RBAC grants exactly the Kubernetes API calls the operator makes: every call is
//! allowed (else the operator fails at runtime with 403), and every grant is used (least
//! privilege). Checked on `manifests/dog.yaml`, the chart rendered with default values
//! (kept in sync by `scripts/check-k8s.sh`).

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// Where a call is made: cluster-wide (ClusterRole) or in the operator's own namespace (Role).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    ReleaseNamespace,
}

/// (API group, resource or resource/subresource, verb, scope)
type Call = (&'static str, &'static str, &'static str, Scope);

/// Every API call the operator makes, from `dog_operator::kube::access::API_ACCESS` (kept next to
/// the code that makes the calls).
fn expected_calls() -> Vec<Call> {
    use Scope::*;
    let mut calls = Vec::new();
    for (group, resource, verbs) in dog_operator::kube::access::API_ACCESS {
        // the Lease and the agents' Pods live in the operator's namespace; everything else
        // is cluster-wide
        let scope = if *resource == "leases" || *resource == "pods" {
            ReleaseNamespace
        } else {
            Cluster
        };
        for verb in *verbs {
            calls.push((*group, *resource, *verb, scope));
        }
    }
    calls
}

#[derive(Deserialize)]
struct Doc {
    kind: Option<String>,
    metadata: Option<Meta>,
    #[serde(default)]
    rules: Vec<PolicyRule>,
    #[serde(rename = "roleRef")]
    role_ref: Option<RoleRef>,
    #[serde(default)]
    subjects: Vec<Subject>,
}
#[derive(Deserialize)]
struct Meta {
    name: String,
}
#[derive(Deserialize)]
struct PolicyRule {
    #[serde(rename = "apiGroups", default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
}
#[derive(Deserialize)]
struct RoleRef {
    kind: String,
    name: String,
}
#[derive(Deserialize)]
struct Subject {
    name: String,
}

const OPERATOR_SA: &str = "dog-operator";

/// Every (group, resource, verb, scope) the operator's ServiceAccount is granted in `yaml`.
fn granted(yaml: &str) -> BTreeSet<(String, String, String, Scope)> {
    let docs: Vec<Doc> = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Doc::deserialize(d).expect("manifest document parses"))
        .collect();
    let mut out = BTreeSet::new();
    for binding in docs.iter().filter(|d| {
        matches!(
            d.kind.as_deref(),
            Some("ClusterRoleBinding" | "RoleBinding")
        ) && d.subjects.iter().any(|s| s.name == OPERATOR_SA)
    }) {
        let role_ref = binding.role_ref.as_ref().expect("binding has a roleRef");
        let scope = match binding.kind.as_deref() {
            Some("RoleBinding") => Scope::ReleaseNamespace,
            _ => Scope::Cluster,
        };
        let role = docs
            .iter()
            .find(|d| {
                d.kind.as_deref() == Some(role_ref.kind.as_str())
                    && d.metadata.as_ref().map(|m| m.name.as_str()) == Some(&role_ref.name)
            })
            .unwrap_or_else(|| panic!("binding refers to missing {}", role_ref.name));
        for rule in &role.rules {
            for g in &rule.api_groups {
                for r in &rule.resources {
                    for v in &rule.verbs {
                        out.insert((g.clone(), r.clone(), v.clone(), scope));
                    }
                }
            }
        }
    }
    out
}

fn manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/dog.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; run scripts/check-k8s.sh --update",
            path.display()
        )
    })
}

fn as_owned(c: &Call) -> (String, String, String, Scope) {
    (c.0.to_string(), c.1.to_string(), c.2.to_string(), c.3)
}

#[test]
fn every_operator_api_call_is_granted() {
    let granted = granted(&manifest());
    let missing: Vec<_> = expected_calls()
        .iter()
        .map(as_owned)
        .filter(|c| !granted.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "chart RBAC lacks: {missing:#?}\n(edit charts/dog/templates/rbac.yaml, then scripts/check-k8s.sh --update)"
    );
}

#[test]
fn nothing_is_granted_that_the_operator_does_not_use() {
    let expected: BTreeSet<_> = expected_calls().iter().map(as_owned).collect();
    let extra: Vec<_> = granted(&manifest())
        .into_iter()
        .filter(|g| !expected.contains(g))
        .collect();
    assert!(extra.is_empty(), "chart RBAC grants unused: {extra:#?}");
}

#[test]
fn the_agent_has_no_kubernetes_api_access() {
    let yaml = manifest();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if kind.ends_with("Binding") {
            let subjects = d["subjects"].as_sequence().cloned().unwrap_or_default();
            assert!(
                subjects.iter().all(|s| s["name"] != "dog-agent"),
                "the agent is bound to a role"
            );
        }
    }
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "dog-agent")
        .expect("agent ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);
}

#[test]
fn checker_notices_a_missing_and_an_extra_grant() {
    let yaml = r#"
kind: ClusterRole
metadata: {name: r}
rules:
  - {apiGroups: [""], resources: [nodes], verbs: [get, delete]}
---
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {kind: ClusterRole, name: r}
subjects: [{kind: ServiceAccount, name: dog-operator}]
"#;
    let g = granted(yaml);
    assert!(g.contains(&("".into(), "nodes".into(), "get".into(), Scope::Cluster)));
    assert!(g.contains(&("".into(), "nodes".into(), "delete".into(), Scope::Cluster)));
    assert!(!g.contains(&("".into(), "nodes".into(), "list".into(), Scope::Cluster)));
}
