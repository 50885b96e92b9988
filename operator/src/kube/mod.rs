//! Kubernetes mode: the reconcile loop fed by watches, writing status with server-side apply,
//! recording Events, creating Hosts for Nodes and for registering agents, and running only
//! while this replica holds the Lease.
//!
//! [`store`] watches the resources, [`status`] and [`events`] write what users read,
//! [`nodes`] keeps a Host per Node, [`identity`] asks the API server who an agent is,
//! [`leader`] holds the Lease, [`listing`] reads everything once (for `compile`), [`access`]
//! lists every API call for RBAC.

pub mod access;
pub mod events;
pub mod identity;
pub mod leader;
pub mod listing;
pub mod nodes;
pub mod status;
pub mod store;

use crate::config::RunArgs;
use crate::crd::{AgentPublicKeys, InterfaceStatus};
use crate::metrics::OperatorMetrics;
use crate::runtime::sinks::{EventSink, IdentityVerifier, Registrar, Source, StatusSink};
use crate::runtime::{Parts, Runtime};
use dog_protocol::broker::{BrokerConfig, OperatorLink};
use dog_protocol::envelope::Sealer;
use dog_protocol::telemetry::Health;
use events::KubeEventSink;
use futures::future::BoxFuture;
use identity::{AgentAccount, TokenReviewVerifier};
use leader::{LeaderConfig, LeaderElector};
use nodes::NodeSync;
use status::KubeStatusSink;
use std::sync::Arc;
use store::SnapshotStore;
use tracing::{info, warn};

struct NodeRegistrar(NodeSync);

impl Registrar for NodeRegistrar {
    fn register<'a>(
        &'a self,
        name: &'a str,
        keys: &'a AgentPublicKeys,
        interfaces: &'a [InterfaceStatus],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.0
                .ensure_host_for_agent(name, keys, interfaces)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn collect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.delete_host(name).await.map_err(|e| e.to_string()) })
    }
}

/// The name this replica holds the Lease under: its pod's name, else the machine's.
fn replica_identity(args: &RunArgs) -> String {
    match &args.pod_name {
        Some(p) => p.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "dog-operator".into()),
    }
}

/// Agents prove who they are with a token of the agent service account, checked by the API
/// server's TokenReview.
fn token_review_verifier(client: &kube::Client, args: &RunArgs) -> Arc<dyn IdentityVerifier> {
    Arc::new(TokenReviewVerifier::new(
        client.clone(),
        args.admission
            .agent_service_account
            .clone()
            .unwrap_or_else(|| AgentAccount {
                namespace: args.namespace.clone(),
                name: "dog-agent".into(),
            }),
        args.admission.identity_audience.clone(),
    ))
}

/// Runs until `shutdown` resolves. Leading is a term: when this replica loses the Lease (a
/// standby took over, or the API server was unreachable past the renew deadline) it stops
/// publishing, stands by, and leads again when it wins the Lease back. It never exits for
/// that: agents keep enforcing throughout, and a control-plane upgrade must not kill both
/// replicas.
pub async fn run(
    args: RunArgs,
    sealer: Sealer,
    broker: BrokerConfig,
    metrics: OperatorMetrics,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let store = SnapshotStore::new(args.debounce);
    tokio::spawn(store.clone().run(client.clone()));

    let identity = replica_identity(&args);
    let elector = LeaderElector::new(
        client.clone(),
        LeaderConfig::new(args.namespace.clone(), identity.clone()),
    );
    let mut is_leader = elector.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut elector_stop = stop_rx.clone();
    let elector_task = tokio::spawn(elector.run(async move {
        let _ = elector_stop.wait_for(|s| *s).await;
    }));

    let status = Arc::new(KubeStatusSink::new(client.clone()));
    let events: Arc<dyn EventSink> =
        Arc::new(KubeEventSink::new(client.clone(), Some(identity.clone())));
    let status_dyn: Arc<dyn StatusSink> = status.clone();
    // the Node sync acts only while this replica leads (it watches `is_leader` itself)
    tokio::spawn(
        NodeSync::new(client.clone(), status_dyn.clone(), events.clone())
            .run(store.clone(), is_leader.clone()),
    );
    let registrar = Arc::new(NodeRegistrar(NodeSync::new(
        client.clone(),
        status_dyn.clone(),
        events.clone(),
    )));

    let broker_users = crate::runtime::broker_users::from_args(&args.management, &broker)?;

    tokio::pin!(shutdown);
    // A term's loop takes ownership of these; the next term gets them back from it.
    let (mut args, mut sealer) = (args, Arc::new(sealer));
    loop {
        // A standby is healthy and ready (it is doing its job: waiting).
        health.set_ready();
        info!(identity = %identity, "waiting for leadership");
        tokio::select! {
            _ = &mut shutdown => break,
            r = is_leader.wait_for(|l| *l) => { r?; }
        }
        metrics.leader.set(1);
        info!(identity = %identity, "leading; waiting for the watches to sync");
        // becoming synced bumps the store's change counter
        let mut synced = store.changes();
        while !store.is_synced() {
            synced.changed().await?;
        }
        let seed = store
            .hosts()
            .into_iter()
            .filter_map(|(n, h)| h.status.clone().map(|s| (n, s)))
            .collect();
        let (link, deliveries) = OperatorLink::start(broker.clone())?;
        let store_for_snapshot = store.clone();
        let verifier = token_review_verifier(&client, &args);
        let runtime = Runtime::new(Parts {
            verifier: Some(verifier),
            broker_users: broker_users.clone(),
            args,
            sealer,
            link: link.clone(),
            deliveries,
            source: Source {
                changes: store.changes(),
                snapshot: Box::new(move || store_for_snapshot.snapshot()),
            },
            status: status_dyn.clone(),
            events: events.clone(),
            registrar: registrar.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            seed,
        });
        let mut lost = is_leader.clone();
        let lost_leadership = async move {
            let _ = lost.wait_for(|l| !*l).await;
        };
        let mut stopping = false;
        (args, sealer) = runtime
            .run(async {
                tokio::select! {
                    _ = &mut shutdown => { stopping = true; }
                    _ = lost_leadership => {}
                }
            })
            .await;
        metrics.leader.set(0);
        link.close();
        if stopping {
            break;
        }
        warn!(identity = %identity, "lost leadership; standing by (agents keep their rules)");
    }
    let _ = stop_tx.send(true);
    let _ = elector_task.await;
    Ok(())
}
