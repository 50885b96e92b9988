//! Kubernetes Events: [`KubeEventSink`] publishes `events.k8s.io/v1` Events through
//! kube-runtime's [`Recorder`] (reporter `dog-operator`; repeats within a few minutes become a
//! series patch instead of a new Event). Events of the cluster-scoped dog objects land in the
//! `default` namespace. Publishing is best effort: a failure is logged, never propagated,
//! because an Event must not stop a reconcile.

use crate::core::events::{DogEvent, EventSeverity};
use crate::crd::{API_GROUP, API_VERSION};
use crate::runtime::sinks::EventSink;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

/// The reporting controller name on every Event.
pub const REPORTER: &str = "dog-operator";

/// The reference Kubernetes attaches an Event to (`regarding`).
pub fn object_ref(event: &DogEvent) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{API_GROUP}/{API_VERSION}")),
        kind: Some(event.kind.to_string()),
        name: Some(event.name.clone()),
        uid: event.uid.clone(),
        ..Default::default()
    }
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
                    EventSeverity::Normal => EventType::Normal,
                    EventSeverity::Warning => EventType::Warning,
                },
                reason: event.reason.clone(),
                note: Some(event.note.clone()),
                action: event.action.clone(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &object_ref(&event)).await {
                tracing::warn!(kind = event.kind, name = %event.name, reason = %event.reason,
                    error = %e, "could not publish Kubernetes Event");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_regard_the_cluster_scoped_object() {
        let r = object_ref(&DogEvent::conflict("n1", &["a".into(), "b".into()]));
        assert_eq!(r.api_version.as_deref(), Some("dogfw.io/v1alpha1"));
        assert_eq!(r.kind.as_deref(), Some("Host"));
        assert_eq!(r.namespace, None);
    }
}
