//! Every Kubernetes API call the operator makes, as RBAC rules: (apiGroup, resource, verbs).
//!
//! Keep this in lock-step with the code: each entry names the module that makes the call. The
//! Helm chart's ClusterRole/Role must cover exactly this (a test checks the chart against it).
//! Leases and the agents' Pods live in the operator's own namespace (a Role is enough); Events for the
//! cluster-scoped dog objects are written to the `default` namespace.

/// (apiGroup, resource, verbs). `""` is the core group.
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    // store.rs: watchers; nodes.rs: get/create in ensure_host_for_agent, SSA patch from Nodes,
    // delete of Hosts retired longer than the retention (runtime/ticks.rs collects them).
    (
        "dogfw.io",
        "hosts",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // status.rs: server-side apply of the status subresource.
    ("dogfw.io", "hosts/status", &["patch"]),
    ("dogfw.io", "groups", &["list", "watch"]),
    ("dogfw.io", "groups/status", &["patch"]),
    ("dogfw.io", "profiles", &["list", "watch"]),
    ("dogfw.io", "profiles/status", &["patch"]),
    ("dogfw.io", "zones", &["list", "watch"]),
    ("dogfw.io", "zones/status", &["patch"]),
    // store.rs: Node watcher (Hosts mirror Nodes).
    ("", "nodes", &["list", "watch"]),
    // store.rs: one name-scoped watch per ConfigMap referenced by a Zone (any namespace).
    ("", "configmaps", &["list", "watch"]),
    // leader.rs: the `dog-operator-leader` Lease in the operator's namespace.
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
    // events.rs: kube-runtime's Recorder creates events and patches repeated ones (series).
    ("events.k8s.io", "events", &["create", "patch"]),
    // identity.rs: an agent's ServiceAccount token is reviewed, and the Pod it is bound to
    // (in the agents' namespace, the release's) read for its node.
    ("authentication.k8s.io", "tokenreviews", &["create"]),
    ("", "pods", &["get"]),
];

/// Verbs granted for `(group, resource)`, if any.
pub fn verbs_for(group: &str, resource: &str) -> Option<&'static [&'static str]> {
    API_ACCESS
        .iter()
        .find(|(g, r, _)| *g == group && *r == resource)
        .map(|(_, _, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_unique_and_verbs_known() {
        let known = [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (g, r, verbs) in API_ACCESS {
            assert!(seen.insert((g, r)), "duplicate entry {g}/{r}");
            assert!(!verbs.is_empty());
            for v in *verbs {
                assert!(known.contains(v), "unknown verb {v} for {g}/{r}");
            }
        }
        assert_eq!(verbs_for("dogfw.io", "hosts/status"), Some(&["patch"][..]));
        assert_eq!(verbs_for("", "secrets"), None);
    }
}
