//! Status of every object, computed from the compiler's output and what the agents reported.
//! Pure: the status writers (server-side apply, or a file in local mode) only store the result.

use crate::core::compile::{Compiled, Diagnostic, HostOutcome, ObjectKind, Severity};
use crate::crd::{
    AgentPublicKeys, Condition, GroupStatus, HashesStatus as CrdHashes, HostState, HostStatus,
    InterfaceStatus, ProfileStatus, ZoneStatus,
};
use dog_protocol::ruleset::FirewallHashes;
use std::collections::BTreeMap;

/// What the operator knows about a host at run time (from heartbeats, keepalives, responses).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostView {
    pub state: HostState,
    pub last_keepalive: Option<String>,
    pub agent_version: Option<String>,
    pub interfaces: Vec<InterfaceStatus>,
    pub pinned_keys: Option<AgentPublicKeys>,
    pub key_fingerprint: Option<String>,
    pub desired_revision: Option<u64>,
    pub applied_revision: Option<u64>,
    pub reported: Option<FirewallHashes>,
    /// The last drift the agent reported and repaired (cleared after a clean keepalive).
    pub drift: Option<String>,
    /// The last apply error the agent reported (cleared by a successful apply).
    pub apply_error: Option<String>,
    /// A key offered that differs from the pinned one (refused).
    pub key_conflict: Option<String>,
    /// Why the last agent that came for this host without a pin was not admitted.
    pub not_admitted: Option<String>,
    /// The agent only observes: it applies nothing and reports what it would change.
    pub observe: bool,
    /// Observe mode: changes that would bring the host to the desired rules.
    pub would_change: Option<u64>,
}

/// At most this many names are listed in a status field.
const LIST_MAX: usize = 20;

fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

/// Carries `lastTransitionTime` over from the previous conditions when a condition's status did
/// not change, and stamps `now` otherwise.
pub fn stamp(
    conditions: &mut [Condition],
    previous: &[Condition],
    now: &str,
    generation: Option<i64>,
) {
    for c in conditions.iter_mut() {
        c.observed_generation = generation;
        c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
            Some(p) if p.status == c.status => p
                .last_transition_time
                .clone()
                .or_else(|| Some(now.to_string())),
            _ => Some(now.to_string()),
        };
    }
}

/// Expected hashes of a host (what it should run), when it runs a firewall.
pub fn expected_hashes(compiled: &Compiled, host: &str) -> Option<FirewallHashes> {
    match compiled.hosts.get(host) {
        Some(HostOutcome::Firewall { firewall, .. }) => Some(firewall.hashes()),
        _ => None,
    }
}

/// Whether `host` reported exactly what it should run.
pub fn realized(compiled: &Compiled, host: &str, view: Option<&HostView>) -> bool {
    match (
        expected_hashes(compiled, host),
        view.and_then(|v| v.reported.as_ref()),
    ) {
        (Some(e), Some(r)) => &e == r,
        _ => false,
    }
}

fn crd_hashes(h: &FirewallHashes) -> CrdHashes {
    CrdHashes {
        ipv4_rules: h.ipv4_rules.clone(),
        ipv6_rules: h.ipv6_rules.clone(),
        sets: h.sets.clone(),
    }
}

fn diag_message(diags: &[&Diagnostic]) -> String {
    let mut parts: Vec<String> = diags
        .iter()
        .take(5)
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect();
    if diags.len() > 5 {
        parts.push(format!("and {} more", diags.len() - 5));
    }
    parts.join("; ")
}

pub fn host_status(compiled: &Compiled, name: &str, view: &HostView) -> HostStatus {
    let outcome = compiled.hosts.get(name);
    let expected = expected_hashes(compiled, name);
    let (group, profile) = match outcome {
        Some(HostOutcome::Firewall { group, profile, .. })
        | Some(HostOutcome::Withheld { group, profile }) => {
            (Some(group.clone()), Some(profile.clone()))
        }
        _ => (None, None),
    };
    let mut conditions = Vec::new();
    let active = view.state == HostState::Active;
    conditions.push(match (&view.key_conflict, &view.apply_error, active) {
        (Some(k), _, _) => cond("Ready", false, "KeyChanged", k.clone()),
        (_, _, false) if view.not_admitted.is_some() => cond(
            "Ready",
            false,
            "NotAdmitted",
            view.not_admitted.clone().unwrap_or_default(),
        ),
        (_, Some(e), _) => cond("Ready", false, "ApplyFailed", e.clone()),
        (_, _, true) => cond(
            "Ready",
            true,
            "AgentActive",
            "the agent is connected and applying",
        ),
        (_, _, false) => cond(
            "Ready",
            false,
            "AgentNotActive",
            format!("host is {:?}", view.state),
        ),
    });
    conditions.push(match (outcome, &expected, &view.reported) {
        (Some(HostOutcome::Firewall { .. }), Some(e), Some(r)) if e == r => cond(
            "InSync",
            true,
            "HashesMatch",
            "the host runs exactly the desired rules and sets",
        ),
        (Some(HostOutcome::Firewall { .. }), Some(_), Some(_)) if view.observe => cond(
            "InSync",
            false,
            "ObserveOnly",
            match view.would_change {
                Some(n) => format!(
                    "observe mode: the agent applies nothing; {n} changes would bring the host to the desired rules"
                ),
                None => "observe mode: the agent applies nothing and has not yet said what it would change".into(),
            },
        ),
        (Some(HostOutcome::Firewall { .. }), Some(_), Some(_)) => cond(
            "InSync",
            false,
            "HashMismatch",
            "reported hashes differ from the expected ones",
        ),
        (Some(HostOutcome::Firewall { .. }), _, None) => {
            cond("InSync", false, "NotReported", "no hashes reported yet")
        }
        (Some(HostOutcome::Withheld { profile, .. }), _, _) => cond(
            "InSync",
            false,
            "ProfileInvalid",
            format!("profile {profile} has errors; the host keeps its last applied rules"),
        ),
        (Some(HostOutcome::Conflict { .. }), _, _) => cond(
            "InSync",
            false,
            "Conflict",
            "the host keeps its last applied rules until the conflict is resolved",
        ),
        _ => cond(
            "InSync",
            false,
            "Unmanaged",
            "the host is in no group with a profile",
        ),
    });
    conditions.push(match &view.drift {
        Some(d) => cond("Drifted", true, "DriftRepaired", d.clone()),
        None => cond("Drifted", false, "NoDrift", "no drift reported"),
    });
    conditions.push(match outcome {
        Some(HostOutcome::Conflict { groups }) => cond(
            "Conflict",
            true,
            "MultipleProfiles",
            format!(
                "labels match groups with different profiles: {}",
                groups.join(", ")
            ),
        ),
        _ => cond("Conflict", false, "NoConflict", ""),
    });
    let diags = compiled.diagnostics_for(ObjectKind::Host, name);
    conditions.push(validity(&diags));
    conditions.push(degradation(&diags));
    HostStatus {
        state: view.state,
        group,
        profile,
        agent_version: view.agent_version.clone(),
        interfaces: view.interfaces.clone(),
        pinned_keys: view.pinned_keys.clone(),
        key_fingerprint: view.key_fingerprint.clone(),
        last_keepalive: view.last_keepalive.clone(),
        desired_revision: view.desired_revision,
        applied_revision: view.applied_revision,
        would_change: view.would_change.filter(|_| view.observe),
        expected_hashes: expected.as_ref().map(crd_hashes),
        reported_hashes: view.reported.as_ref().map(crd_hashes),
        conditions,
        observed_generation: None,
    }
}

/// Where the status functions find what the operator knows of each host at run time.
pub trait Views {
    fn view(&self, host: &str) -> Option<&HostView>;
}

impl Views for BTreeMap<String, HostView> {
    fn view(&self, host: &str) -> Option<&HostView> {
        self.get(host)
    }
}

fn realization(
    compiled: &Compiled,
    hosts: &[String],
    views: &dyn Views,
) -> (u64, u64, Vec<String>) {
    // a Retired host is not expected to run anything
    let hosts: Vec<&String> = hosts
        .iter()
        .filter(|h| views.view(h).is_none_or(|v| v.state != HostState::Retired))
        .collect();
    let pending: Vec<String> = hosts
        .iter()
        .filter(|h| !realized(compiled, h, views.view(h)))
        .map(|h| (*h).clone())
        .collect();
    let desired = hosts.len() as u64;
    let done = desired - pending.len() as u64;
    (desired, done, pending.into_iter().take(LIST_MAX).collect())
}

fn of_severity<'a>(diags: &[&'a Diagnostic], severity: Severity) -> Vec<&'a Diagnostic> {
    diags
        .iter()
        .filter(|d| d.severity == severity)
        .copied()
        .collect()
}

fn validity(diags: &[&Diagnostic]) -> Condition {
    let errors = of_severity(diags, Severity::Error);
    match errors.first() {
        None => cond("Valid", true, "Valid", "no problems found"),
        Some(d) => cond("Valid", false, d.reason.as_str(), diag_message(&errors)),
    }
}

/// `Degraded: True` when the object applies, but not as written (see [`Severity::Warning`]).
fn degradation(diags: &[&Diagnostic]) -> Condition {
    let warnings = of_severity(diags, Severity::Warning);
    match warnings.first() {
        None => cond(
            "Degraded",
            false,
            "AsWritten",
            "everything applies as written",
        ),
        Some(d) => cond("Degraded", true, d.reason.as_str(), diag_message(&warnings)),
    }
}

fn realized_condition(desired: u64, done: u64, pending: &[String]) -> Condition {
    if done == desired {
        cond(
            "Realized",
            true,
            "AllHostsInSync",
            format!("{done}/{desired} hosts run the current rules"),
        )
    } else {
        cond(
            "Realized",
            false,
            "HostsPending",
            format!(
                "{done}/{desired} hosts run the current rules; pending: {}",
                pending.join(", ")
            ),
        )
    }
}

pub fn group_status(compiled: &Compiled, name: &str, views: &dyn Views) -> GroupStatus {
    let summary = compiled.groups.get(name).cloned().unwrap_or_default();
    let diags = compiled.diagnostics_for(ObjectKind::Group, name);
    let (desired, done, pending) = realization(compiled, &summary.hosts_running, views);
    GroupStatus {
        member_count: summary.members.len() as u64,
        members: summary.members.iter().take(100).cloned().collect(),
        ipv4_addresses: summary.ipv4_addresses,
        ipv6_addresses: summary.ipv6_addresses,
        hosts_desired: desired,
        hosts_realized: done,
        conditions: vec![
            validity(&diags),
            degradation(&diags),
            realized_condition(desired, done, &pending),
        ],
        hosts_pending: pending,
        observed_generation: None,
    }
}

pub fn profile_status(compiled: &Compiled, name: &str, views: &dyn Views) -> ProfileStatus {
    let summary = compiled.profiles.get(name).cloned().unwrap_or_default();
    let diags = compiled.diagnostics_for(ObjectKind::Profile, name);
    let (desired, done, pending) = realization(compiled, &summary.hosts, views);
    ProfileStatus {
        inbound_rules: summary.inbound_rules,
        outbound_rules: summary.outbound_rules,
        hosts_desired: desired,
        hosts_realized: done,
        conditions: vec![
            validity(&diags),
            degradation(&diags),
            realized_condition(desired, done, &pending),
        ],
        hosts_pending: pending,
        observed_generation: None,
    }
}

pub fn zone_status(compiled: &Compiled, name: &str) -> ZoneStatus {
    let summary = compiled.zones.get(name).cloned().unwrap_or_default();
    let diags = compiled.diagnostics_for(ObjectKind::Zone, name);
    ZoneStatus {
        ipv4_count: summary.ipv4_count,
        ipv6_count: summary.ipv6_count,
        invalid_count: summary.invalid_count,
        invalid_entries: summary.invalid_entries.clone(),
        conditions: vec![validity(&diags), degradation(&diags)],
        observed_generation: None,
    }
}
