//! Hosts for Kubernetes Nodes, and for agents on servers outside Kubernetes.
//!
//! Pure core: [`desired_host_for_node`] (the Host a Node implies: same name, the Node's labels,
//! `spec.nodeName`, `spec.addresses` from its InternalIP/ExternalIP addresses) and
//! [`plan_node_sync`] (which Hosts to apply, which to mark Retired because their Node is gone).
//!
//! IO shell: [`NodeSync`] applies Hosts with server-side apply, field manager `dog-operator`,
//! sending ONLY `metadata.labels`, `spec.nodeName` and `spec.addresses` — so it never fights
//! the status writer or fields users own (e.g. an admin's `spec.group` or `spec.keys`). A
//! deleted Node's Host is not deleted: its status becomes `Retired` (through the shared
//! [`StatusSink`], keeping the rest of the status) and an Event is published.
//! [`NodeSync::ensure_host_for_agent`] creates the Host of a non-Kubernetes agent on its first
//! heartbeat.

use crate::core::events::DogEvent;
use crate::crd::{AgentPublicKeys, Host, HostSpec, HostState, HostStatus, InterfaceStatus};
use crate::kube::status::FIELD_MANAGER;
use crate::kube::store::SnapshotStore;
use crate::runtime::sinks::{EventSink, StatusError, StatusSink};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum NodeSyncError {
    #[error("applying Host {name}: {source}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading or creating Host {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting Host {name}: {source}")]
    Delete {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// The Host a Node implies. Only addresses of type InternalIP/ExternalIP that parse as IPs
/// are kept (deduplicated, in the Node's order).
pub fn desired_host_for_node(node: &Node) -> Host {
    let name = node.name_any();
    let mut addresses: Vec<String> = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        let Ok(ip) = a.address.trim().parse::<IpAddr>() else {
            tracing::warn!(node = %name, address = %a.address, "ignoring unparseable Node address");
            continue;
        };
        let text = ip.to_string();
        if !addresses.contains(&text) {
            addresses.push(text);
        }
    }
    let mut host = Host::new(
        &name,
        HostSpec {
            addresses,
            node_name: Some(name.clone()),
            ..Default::default()
        },
    );
    host.metadata.labels = Some(node.labels().clone());
    host
}

/// What one Node→Host pass should do.
#[derive(Clone, Debug, Default)]
pub struct NodeSyncPlan {
    /// Hosts to server-side apply (labels + nodeName + addresses only).
    pub apply: Vec<Host>,
    /// Hosts whose Node is gone and which are not Retired yet.
    pub retire: Vec<String>,
}

/// Whether `current` already carries everything `desired` sets.
fn satisfies(current: &Host, desired: &Host) -> bool {
    let cur_labels = current.labels();
    let labels_ok = desired
        .labels()
        .iter()
        .all(|(k, v)| cur_labels.get(k) == Some(v));
    labels_ok
        && current.spec.node_name == desired.spec.node_name
        && current.spec.addresses == desired.spec.addresses
}

/// Plans one pass. `applied` is what this process last applied per Host: a Host carrying
/// labels the Node lacks is re-applied once per process (that removes labels we set earlier
/// and the Node dropped, while labels users added are kept by server-side apply).
pub fn plan_node_sync(
    nodes: &BTreeMap<String, Arc<Node>>,
    hosts: &BTreeMap<String, Arc<Host>>,
    applied: &HashMap<String, serde_json::Value>,
) -> NodeSyncPlan {
    let mut plan = NodeSyncPlan::default();
    for node in nodes.values() {
        let desired = desired_host_for_node(node);
        let name = desired.name_any();
        let body = apply_body(&desired);
        let needed = match hosts.get(&name) {
            None => applied.get(&name) != Some(&body),
            Some(current) => {
                let extra_labels = current.labels().len() > desired.labels().len();
                !satisfies(current, &desired) || (extra_labels && applied.get(&name) != Some(&body))
            }
        };
        if needed {
            plan.apply.push(desired);
        }
    }
    for (name, host) in hosts {
        let Some(node_name) = host.spec.node_name.as_deref() else {
            continue;
        };
        let state = host.status.as_ref().map(|s| s.state).unwrap_or_default();
        if !nodes.contains_key(node_name) && state != HostState::Retired {
            plan.retire.push(name.clone());
        }
    }
    plan
}

/// The server-side apply body for a Host from a Node: labels, nodeName, addresses.
pub fn apply_body(desired: &Host) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "dogfw.io/v1alpha1",
        "kind": "Host",
        "metadata": {
            "name": desired.name_any(),
            "labels": desired.labels(),
        },
        "spec": {
            "nodeName": desired.spec.node_name,
            "addresses": desired.spec.addresses,
        },
    })
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub applied: Vec<String>,
    pub retired: Vec<String>,
    pub failed: Vec<String>,
}

/// Keeps Hosts in line with Nodes. Run only on the leader.
pub struct NodeSync {
    api: Api<Host>,
    status: Arc<dyn StatusSink>,
    events: Arc<dyn EventSink>,
    applied: HashMap<String, serde_json::Value>,
}

impl NodeSync {
    pub fn new(client: Client, status: Arc<dyn StatusSink>, events: Arc<dyn EventSink>) -> Self {
        Self {
            api: Api::all(client),
            status,
            events,
            applied: HashMap::new(),
        }
    }

    /// One pass over `nodes` and `hosts` (from a synced store). Failures of single Hosts are
    /// logged and listed; the others proceed.
    pub async fn sync_once(
        &mut self,
        nodes: &BTreeMap<String, Arc<Node>>,
        hosts: &BTreeMap<String, Arc<Host>>,
    ) -> SyncReport {
        let plan = plan_node_sync(nodes, hosts, &self.applied);
        let mut report = SyncReport::default();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for desired in plan.apply {
            let name = desired.name_any();
            match self
                .api
                .patch(&name, &pp, &Patch::Apply(apply_body(&desired)))
                .await
            {
                Ok(_) => {
                    tracing::info!(host = %name, "Host applied from Node");
                    self.applied.insert(name.clone(), apply_body(&desired));
                    report.applied.push(name);
                }
                Err(source) => {
                    let e = NodeSyncError::Apply {
                        name: name.clone(),
                        source,
                    };
                    tracing::warn!(error = %e, "could not apply Host from Node");
                    report.failed.push(name);
                }
            }
        }
        for name in plan.retire {
            let Some(host) = hosts.get(&name) else {
                continue;
            };
            let mut status = host.status.clone().unwrap_or_default();
            let from = status.state;
            status.state = HostState::Retired;
            match self
                .status
                .write_host(&name, host.metadata.generation, status)
                .await
            {
                Ok(()) => {
                    tracing::info!(host = %name, "Node deleted, Host retired");
                    self.applied.remove(&name);
                    self.events
                        .publish(
                            DogEvent::host_state_changed(&name, from, HostState::Retired)
                                .with_uid(host.uid()),
                        )
                        .await;
                    report.retired.push(name);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not retire Host");
                    report.failed.push(name);
                }
            }
        }
        report
    }

    /// Syncs on every store change while `is_leader` is true, until the store goes away.
    pub async fn run(mut self, store: Arc<SnapshotStore>, mut is_leader: watch::Receiver<bool>) {
        let mut changes = store.changes();
        loop {
            if *is_leader.borrow_and_update() && store.is_synced() {
                self.sync_once(&store.nodes(), &store.hosts()).await;
            } else {
                // a new leader re-checks everything
                self.applied.clear();
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                r = is_leader.changed() => if r.is_err() { return },
            }
        }
    }

    /// Deletes a Host (retired past the retention); one already gone counts as deleted.
    pub async fn delete_host(&self, name: &str) -> Result<(), NodeSyncError> {
        match self.api.delete(name, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(source) => Err(NodeSyncError::Delete {
                name: name.to_string(),
                source,
            }),
        }
    }

    /// Makes sure a Host exists for an agent that is not a Kubernetes Node (called from the
    /// heartbeat handler). An existing Host is returned unchanged. A new one is created with
    /// an empty spec and a first status: state `New`, the agent's keys pinned (trust on first
    /// use) and its interfaces. `keyFingerprint` is left for the heartbeat handler to fill.
    pub async fn ensure_host_for_agent(
        &self,
        name: &str,
        keys: &AgentPublicKeys,
        interfaces: &[InterfaceStatus],
    ) -> Result<Host, NodeSyncError> {
        let err = |source| NodeSyncError::Create {
            name: name.to_string(),
            source,
        };
        if let Some(h) = self.api.get_opt(name).await.map_err(err)? {
            return Ok(h);
        }
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let mut created = match self
            .api
            .create(&pp, &Host::new(name, HostSpec::default()))
            .await
        {
            Ok(h) => h,
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                // created concurrently (e.g. from its Node): use that one
                return self.api.get(name).await.map_err(err);
            }
            Err(e) => return Err(err(e)),
        };
        let status = HostStatus {
            state: HostState::New,
            pinned_keys: Some(keys.clone()),
            interfaces: interfaces.to_vec(),
            ..Default::default()
        };
        self.status
            .write_host(name, created.metadata.generation, status.clone())
            .await?;
        tracing::info!(host = %name, "Host created for agent");
        created.status = Some(HostStatus {
            observed_generation: created.metadata.generation,
            ..status
        });
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(name: &str, labels: &[(&str, &str)], addrs: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.status = Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        n
    }

    #[test]
    fn host_copies_labels_and_ip_addresses() {
        let n = node(
            "worker-1",
            &[("kubernetes.io/hostname", "worker-1"), ("role", "db")],
            &[
                ("Hostname", "worker-1"),
                ("InternalIP", "10.0.0.5"),
                ("ExternalIP", "2001:db8::5"),
                ("InternalDNS", "worker-1.internal"),
                ("InternalIP", "10.0.0.5"),
                ("ExternalIP", "not-an-ip"),
            ],
        );
        let h = desired_host_for_node(&n);
        assert_eq!(h.name_any(), "worker-1");
        assert_eq!(h.labels().get("role").map(String::as_str), Some("db"));
        assert_eq!(h.labels().len(), 2);
        assert_eq!(h.spec.node_name.as_deref(), Some("worker-1"));
        assert_eq!(h.spec.addresses, vec!["10.0.0.5", "2001:db8::5"]);
        assert_eq!(h.spec.group, None);
        assert_eq!(h.spec.keys, None);
        assert!(h.status.is_none());
    }

    #[test]
    fn node_without_status_or_labels() {
        let mut n = Node::default();
        n.metadata.name = Some("bare".into());
        let h = desired_host_for_node(&n);
        assert!(h.labels().is_empty());
        assert!(h.spec.addresses.is_empty());
        let body = apply_body(&h);
        assert_eq!(body["metadata"]["labels"], serde_json::json!({}));
        assert_eq!(body["spec"]["nodeName"], "bare");
        assert!(body.get("status").is_none());
    }

    #[test]
    fn plan_creates_missing_and_skips_satisfied_hosts() {
        let nodes: BTreeMap<_, _> = [
            (
                "a".to_string(),
                Arc::new(node("a", &[("r", "x")], &[("InternalIP", "10.0.0.1")])),
            ),
            ("b".to_string(), Arc::new(node("b", &[], &[]))),
        ]
        .into();
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "b".to_string(),
            Arc::new(desired_host_for_node(&nodes["b"])),
        );
        let plan = plan_node_sync(&nodes, &hosts, &HashMap::new());
        assert_eq!(
            plan.apply.iter().map(|h| h.name_any()).collect::<Vec<_>>(),
            vec!["a"]
        );
        assert!(plan.retire.is_empty());
    }

    #[test]
    fn plan_reapplies_changed_labels_and_addresses() {
        let n = node("a", &[("r", "y")], &[("InternalIP", "10.0.0.2")]);
        let old = desired_host_for_node(&node("a", &[("r", "x")], &[("InternalIP", "10.0.0.2")]));
        let nodes: BTreeMap<_, _> = [("a".to_string(), Arc::new(n.clone()))].into();
        let hosts: BTreeMap<_, _> = [("a".to_string(), Arc::new(old))].into();
        assert_eq!(
            plan_node_sync(&nodes, &hosts, &HashMap::new()).apply.len(),
            1
        );
        let old = desired_host_for_node(&node("a", &[("r", "y")], &[("InternalIP", "10.0.0.3")]));
        let hosts: BTreeMap<_, _> = [("a".to_string(), Arc::new(old))].into();
        assert_eq!(
            plan_node_sync(&nodes, &hosts, &HashMap::new()).apply.len(),
            1
        );
    }

    #[test]
    fn extra_labels_are_reapplied_once_per_process() {
        let n = node("a", &[("r", "x")], &[]);
        let mut current = desired_host_for_node(&n);
        current
            .labels_mut()
            .insert("team".into(), "added-by-user".into());
        let nodes: BTreeMap<_, _> = [("a".to_string(), Arc::new(n.clone()))].into();
        let hosts: BTreeMap<_, _> = [("a".to_string(), Arc::new(current))].into();
        let plan = plan_node_sync(&nodes, &hosts, &HashMap::new());
        assert_eq!(plan.apply.len(), 1);
        let applied: HashMap<_, _> =
            [("a".to_string(), apply_body(&desired_host_for_node(&n)))].into();
        assert!(plan_node_sync(&nodes, &hosts, &applied).apply.is_empty());
    }

    #[test]
    fn hosts_of_deleted_nodes_are_retired_once_and_agent_hosts_left_alone() {
        let nodes = BTreeMap::new();
        let gone = desired_host_for_node(&node("gone", &[], &[]));
        let mut retired = desired_host_for_node(&node("old", &[], &[]));
        retired.status = Some(HostStatus {
            state: HostState::Retired,
            ..Default::default()
        });
        let vm = Host::new("vm-1", HostSpec::default());
        let hosts: BTreeMap<_, _> = [
            ("gone".to_string(), Arc::new(gone)),
            ("old".to_string(), Arc::new(retired)),
            ("vm-1".to_string(), Arc::new(vm)),
        ]
        .into();
        let plan = plan_node_sync(&nodes, &hosts, &HashMap::new());
        assert_eq!(plan.retire, vec!["gone"]);
        assert!(plan.apply.is_empty());
    }
}
