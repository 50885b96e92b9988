//! The loop's ports: every way [`super::Runtime`] reaches the outside other than the broker.
//! Each mode plugs its own implementations in: the API server's in [`crate::kube`], files and
//! the log in [`crate::dir`].
//!
//! The traits are object-safe (`Arc<dyn …>`): their methods return boxed futures instead of
//! using `async fn` in the trait, which is not dyn-compatible on Rust 1.95 (and we avoid the
//! `async-trait` macro).

use crate::core::compile::Snapshot;
use crate::core::events::{DogEvent, EventSeverity};
use crate::crd::{
    AgentPublicKeys, GroupStatus, HostStatus, InterfaceStatus, ProfileStatus, ZoneStatus,
};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// Creates the Host object for an agent that registered itself (a VM, not a Kubernetes Node),
/// and deletes a Host retired for longer than the retention.
pub trait Registrar: Send + Sync {
    fn register<'a>(
        &'a self,
        name: &'a str,
        keys: &'a AgentPublicKeys,
        interfaces: &'a [InterfaceStatus],
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes the Host (gone already counts as done).
    fn collect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Whether this mode deletes Hosts at all (`--from-dir` mode does not: its Hosts are
    /// files an administrator owns).
    fn collects(&self) -> bool {
        true
    }
}

/// Where the loop reads the resources from.
pub struct Source {
    /// Bumped (coalesced) whenever the resources changed.
    pub changes: watch::Receiver<u64>,
    /// The current resources.
    pub snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("writing status of {kind} {name}: {source}")]
    Kube {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("serializing status of {kind} {name}: {source}")]
    Serialize {
        kind: &'static str,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing status of {kind} {name}: {message}")]
    Other {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// One object's status, as a sink stores it.
#[derive(Clone, Debug)]
pub enum ObjectStatus {
    Host(Box<HostStatus>),
    Group(GroupStatus),
    Profile(ProfileStatus),
    Zone(ZoneStatus),
}

impl ObjectStatus {
    /// The same status recording `generation` as its `observedGeneration`.
    fn observing(mut self, generation: Option<i64>) -> Self {
        match &mut self {
            ObjectStatus::Host(s) => s.observed_generation = generation,
            ObjectStatus::Group(s) => s.observed_generation = generation,
            ObjectStatus::Profile(s) => s.observed_generation = generation,
            ObjectStatus::Zone(s) => s.observed_generation = generation,
        }
        self
    }
}

/// Where statuses go: the API server ([`KubeStatusSink`]) or files in `--from-dir` mode.
/// An implementation stores one [`ObjectStatus`] ([`StatusSink::write`]); the typed
/// `write_*` calls set `generation` (the object's `metadata.generation`, None when unknown)
/// as the status' `observedGeneration` and hand it over.
pub trait StatusSink: Send + Sync {
    fn write<'a>(
        &'a self,
        name: &'a str,
        status: ObjectStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>>;
    /// The object is gone: drop whatever the sink remembers about it.
    fn forget(&self, kind: &'static str, name: &str);

    fn write_host<'a>(
        &'a self,
        name: &'a str,
        generation: Option<i64>,
        status: HostStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.write(
            name,
            ObjectStatus::Host(Box::new(status)).observing(generation),
        )
    }
    fn write_group<'a>(
        &'a self,
        name: &'a str,
        generation: Option<i64>,
        status: GroupStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.write(name, ObjectStatus::Group(status).observing(generation))
    }
    fn write_profile<'a>(
        &'a self,
        name: &'a str,
        generation: Option<i64>,
        status: ProfileStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.write(name, ObjectStatus::Profile(status).observing(generation))
    }
    fn write_zone<'a>(
        &'a self,
        name: &'a str,
        generation: Option<i64>,
        status: ZoneStatus,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.write(name, ObjectStatus::Zone(status).observing(generation))
    }
}

/// Where events go. Object-safe (`Arc<dyn EventSink>`), boxed futures for the same reason as
/// [`StatusSink`].
pub trait EventSink: Send + Sync {
    /// Best effort: failures are logged by the implementation.
    fn publish<'a>(&'a self, event: DogEvent) -> BoxFuture<'a, ()>;
}

/// Logs events as structured lines (local / `--from-dir` mode).
#[derive(Default)]
pub struct LogEventSink;

impl EventSink for LogEventSink {
    fn publish<'a>(&'a self, event: DogEvent) -> BoxFuture<'a, ()> {
        match event.severity {
            EventSeverity::Normal => tracing::info!(kind = event.kind, name = %event.name,
                reason = %event.reason, action = %event.action, "{}", event.note),
            EventSeverity::Warning => tracing::warn!(kind = event.kind, name = %event.name,
                reason = %event.reason, action = %event.action, "{}", event.note),
        }
        Box::pin(async {})
    }
}

/// Answers which node the holder of an identity token runs on.
pub trait IdentityVerifier: Send + Sync {
    /// `Ok(node)` when the authority vouches for the token; `Err(why)` otherwise.
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, String>>;
}
