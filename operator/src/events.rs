//! Kubernetes Events for what a person should see: a host going inactive / active / retired,
//! drift detected and repaired, an apply that failed on a host, a group conflict.
//!
//! [`EventSink`] is the seam; [`KubeEventSink`] publishes `events.k8s.io/v1` Events through
//! kube-runtime's [`Recorder`] (reporter `dog-operator`; repeats within a few minutes become a
//! series patch instead of a new Event). Events of the cluster-scoped dog objects land in the
//! `default` namespace. [`LogEventSink`] logs instead, for `--from-dir` mode. Publishing is best
//! effort: a failure is logged, never propagated, because an Event must not stop a reconcile.

use crate::crd::{HostState, API_GROUP, API_VERSION};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

/// The reporting controller name on every Event.
pub const REPORTER: &str = "dog-operator";

/// Severity, mirroring Kubernetes' `Normal` / `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// One event about one dog object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DogEvent {
    /// `Host`, `Group`, `Profile` or `Zone`.
    pub kind: &'static str,
    pub name: String,
    /// The object's uid when known (lets `kubectl describe` match the Event).
    pub uid: Option<String>,
    pub severity: Severity,
    /// CamelCase, e.g. `HostInactive`.
    pub reason: String,
    /// CamelCase, what the operator did, e.g. `Lifecycle`.
    pub action: String,
    pub note: String,
}

impl DogEvent {
    /// A host changed lifecycle state (`Inactive` and `Retired` are warnings).
    pub fn host_state_changed(name: &str, from: HostState, to: HostState) -> Self {
        let (severity, reason) = match to {
            HostState::Active => (Severity::Normal, "HostActive"),
            HostState::Inactive => (Severity::Warning, "HostInactive"),
            HostState::Retired => (Severity::Warning, "HostRetired"),
            HostState::New => (Severity::Normal, "HostNew"),
        };
        Self::host(
            name,
            severity,
            reason,
            "Lifecycle",
            format!("host {name} went from {from:?} to {to:?}"),
        )
    }

    /// The agent found dog's chains or sets edited and put them back.
    pub fn drift_repaired(name: &str, detail: &str) -> Self {
        Self::host(
            name,
            Severity::Warning,
            "DriftRepaired",
            "Repair",
            format!("drift detected and repaired on host {name}: {detail}"),
        )
    }

    /// The agent failed to apply the rules it was sent; the previous rules stay in force.
    pub fn apply_failed(name: &str, revision: u64, error: &str) -> Self {
        Self::host(
            name,
            Severity::Warning,
            "ApplyFailed",
            "Apply",
            format!("host {name} failed to apply revision {revision}: {error}"),
        )
    }

    /// The host's labels match several groups with different profiles.
    pub fn conflict(name: &str, groups: &[String]) -> Self {
        Self::host(
            name,
            Severity::Warning,
            "GroupConflict",
            "Compile",
            format!(
                "host {name} matches groups with different profiles ({}); keeping its last applied rules",
                groups.join(", ")
            ),
        )
    }

    fn host(name: &str, severity: Severity, reason: &str, action: &str, note: String) -> Self {
        Self {
            kind: "Host",
            name: name.to_string(),
            uid: None,
            severity,
            reason: reason.to_string(),
            action: action.to_string(),
            note,
        }
    }

    /// A Retired host was deleted after the retention.
    pub fn host_collected(name: &str, retention: std::time::Duration) -> Self {
        Self::host(
            name,
            Severity::Normal,
            "HostDeleted",
            "GarbageCollect",
            format!(
                "host {name} was Retired and silent for more than {} s: deleted",
                retention.as_secs()
            ),
        )
    }

    /// Sets the object's uid.
    pub fn with_uid(mut self, uid: Option<String>) -> Self {
        self.uid = uid;
        self
    }

    /// The reference Kubernetes attaches the Event to (`regarding`).
    pub fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(format!("{API_GROUP}/{API_VERSION}")),
            kind: Some(self.kind.to_string()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }
}

/// Where events go. Object-safe (`Arc<dyn EventSink>`), boxed futures for the same reason as
/// [`crate::status::StatusSink`].
pub trait EventSink: Send + Sync {
    /// Best effort: failures are logged by the implementation.
    fn publish<'a>(&'a self, event: DogEvent) -> BoxFuture<'a, ()>;
}

/// Publishes through the API server.
pub struct KubeEventSink {
    recorder: Recorder,
}

impl KubeEventSink {
    /// `instance` is the pod name (reportingInstance), e.g. from the downward API.
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: REPORTER.to_string(),
            instance,
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }
}

impl EventSink for KubeEventSink {
    fn publish<'a>(&'a self, event: DogEvent) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ev = Event {
                type_: match event.severity {
                    Severity::Normal => EventType::Normal,
                    Severity::Warning => EventType::Warning,
                },
                reason: event.reason.clone(),
                note: Some(event.note.clone()),
                action: event.action.clone(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &event.object_ref()).await {
                tracing::warn!(kind = event.kind, name = %event.name, reason = %event.reason,
                    error = %e, "could not publish Kubernetes Event");
            }
        })
    }
}

/// Logs events as structured lines (local / `--from-dir` mode).
#[derive(Default)]
pub struct LogEventSink;

impl EventSink for LogEventSink {
    fn publish<'a>(&'a self, event: DogEvent) -> BoxFuture<'a, ()> {
        match event.severity {
            Severity::Normal => tracing::info!(kind = event.kind, name = %event.name,
                reason = %event.reason, action = %event.action, "{}", event.note),
            Severity::Warning => tracing::warn!(kind = event.kind, name = %event.name,
                reason = %event.reason, action = %event.action, "{}", event.note),
        }
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_map_to_reasons_and_severity() {
        let e = DogEvent::host_state_changed("n1", HostState::Active, HostState::Inactive);
        assert_eq!(e.reason, "HostInactive");
        assert_eq!(e.severity, Severity::Warning);
        assert_eq!(e.note, "host n1 went from Active to Inactive");
        let e = DogEvent::host_state_changed("n1", HostState::Inactive, HostState::Active);
        assert_eq!(
            (e.reason.as_str(), e.severity),
            ("HostActive", Severity::Normal)
        );
        let r = DogEvent::conflict("n1", &["a".into(), "b".into()]).object_ref();
        assert_eq!(r.api_version.as_deref(), Some("dogfw.io/v1alpha1"));
        assert_eq!(r.kind.as_deref(), Some("Host"));
        assert_eq!(r.namespace, None);
    }
}
