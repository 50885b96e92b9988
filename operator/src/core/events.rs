//! The Events a person should see: a host going inactive / active / retired, drift detected
//! and repaired, an apply that failed on a host, a group conflict. Where they go is the
//! runtime's [`crate::runtime::sinks::EventSink`]: the API server in Kubernetes mode, the log
//! in `--from-dir` mode.

use crate::crd::HostState;

/// An event's severity, mirroring Kubernetes' `Normal` / `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSeverity {
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
    pub severity: EventSeverity,
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
            HostState::Active => (EventSeverity::Normal, "HostActive"),
            HostState::Inactive => (EventSeverity::Warning, "HostInactive"),
            HostState::Retired => (EventSeverity::Warning, "HostRetired"),
            HostState::New => (EventSeverity::Normal, "HostNew"),
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
            EventSeverity::Warning,
            "DriftRepaired",
            "Repair",
            format!("drift detected and repaired on host {name}: {detail}"),
        )
    }

    /// The agent failed to apply the rules it was sent; the previous rules stay in force.
    pub fn apply_failed(name: &str, revision: u64, error: &str) -> Self {
        Self::host(
            name,
            EventSeverity::Warning,
            "ApplyFailed",
            "Apply",
            format!("host {name} failed to apply revision {revision}: {error}"),
        )
    }

    /// The host's labels match several groups with different profiles.
    pub fn conflict(name: &str, groups: &[String]) -> Self {
        Self::host(
            name,
            EventSeverity::Warning,
            "GroupConflict",
            "Compile",
            format!(
                "host {name} matches groups with different profiles ({}); keeping its last applied rules",
                groups.join(", ")
            ),
        )
    }

    fn host(name: &str, severity: EventSeverity, reason: &str, action: &str, note: String) -> Self {
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
            EventSeverity::Normal,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_map_to_reasons_and_severity() {
        let e = DogEvent::host_state_changed("n1", HostState::Active, HostState::Inactive);
        assert_eq!(e.reason, "HostInactive");
        assert_eq!(e.severity, EventSeverity::Warning);
        assert_eq!(e.note, "host n1 went from Active to Inactive");
        let e = DogEvent::host_state_changed("n1", HostState::Inactive, HostState::Active);
        assert_eq!(
            (e.reason.as_str(), e.severity),
            ("HostActive", EventSeverity::Normal)
        );
    }
}
