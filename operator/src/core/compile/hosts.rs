//! One host as the compiler sees it: the groups it is in, the firewall that makes it run, and
//! the addresses it is reached by (its spec's, and what its agent reported inside trusted
//! ranges: a compromised agent must not put addresses it does not own into other hosts' sets).

use super::addresses::{parse_entry, parse_host_address};
use super::resolve::{resolve, Groups, Resolution};
use super::{Diagnostic, HostFacts, ObjectKind, Reason, Severity};
use crate::crd::{Host, HostState};
use ipnet::IpNet;

/// At most this many refused reported addresses are listed per host.
const UNTRUSTED_LISTED: usize = 8;

/// What the compiler derived for one host.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct HostBuild {
    /// Member groups, sorted.
    pub groups: Vec<String>,
    pub resolution: Resolution,
    /// Addresses other hosts reach it by.
    pub addrs: Vec<IpNet>,
    /// A retired host's addresses leave its groups' sets.
    pub retired: bool,
    pub diags: Vec<Diagnostic>,
}

/// Derives host `name` from its resource, its facts and its member `groups` (sorted).
pub(super) fn derive(
    name: &str,
    host: &Host,
    facts: Option<&HostFacts>,
    groups: Vec<String>,
    all_groups: &Groups,
    operator_trust: &[IpNet],
) -> HostBuild {
    let mut diags = Vec::new();
    let diag = |field: &str, reason, message, severity| Diagnostic {
        kind: ObjectKind::Host,
        name: name.to_string(),
        field: field.to_string(),
        reason,
        message,
        severity,
    };
    if let Some(pin) = &host.spec.group {
        if !all_groups.contains_key(pin) {
            diags.push(diag(
                "spec.group",
                Reason::DanglingReference,
                format!("pinned group `{pin}` does not exist"),
                Severity::Error,
            ));
        }
    }
    let resolution = resolve(&groups, all_groups);
    if let Resolution::Conflict { groups: clash } = &resolution {
        let listed: Vec<String> = clash
            .iter()
            .map(|g| {
                let profile = all_groups
                    .get(g)
                    .and_then(|x| x.spec.profile.clone())
                    .unwrap_or_default();
                format!("{g} ({profile})")
            })
            .collect();
        diags.push(diag(
            "metadata.labels",
            Reason::Conflict,
            format!(
                "member of groups with different profiles: {}",
                listed.join(", ")
            ),
            Severity::Error,
        ));
    }
    let own = trusted_ranges(name, host, &groups, all_groups, &mut diags);
    let trusted = Trusted {
        operator: operator_trust,
        own: &own,
    };
    let addrs = host_addresses(name, host, facts, trusted, &mut diags);
    HostBuild {
        groups,
        resolution,
        addrs,
        retired: facts.is_some_and(|f| f.state == HostState::Retired),
        diags,
    }
}

/// The ranges, beyond the operator's, within which `name`'s reported addresses are believed:
/// its own and its Groups' `spec.trustReportedAddresses`. A Host entry that does not parse is
/// reported on the Host (a Group's by the group sets) and trusts nothing.
fn trusted_ranges(
    name: &str,
    host: &Host,
    groups: &[String],
    all_groups: &Groups,
    diags: &mut Vec<Diagnostic>,
) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, text) in host.spec.trust_reported_addresses.iter().enumerate() {
        match parse_entry(text) {
            Ok(n) => out.push(n),
            Err(m) => diags.push(Diagnostic {
                kind: ObjectKind::Host,
                name: name.to_string(),
                field: format!("spec.trustReportedAddresses[{i}]"),
                reason: Reason::InvalidAddress,
                message: format!("{m}; entry ignored"),
                severity: Severity::Error,
            }),
        }
    }
    out.extend(
        groups
            .iter()
            .filter_map(|g| all_groups.get(g))
            .flat_map(|g| &g.spec.trust_reported_addresses)
            .filter_map(|t| parse_entry(t).ok()),
    );
    out
}

/// Where a host's reported addresses are believed: the operator's ranges and its own.
#[derive(Clone, Copy)]
struct Trusted<'a> {
    operator: &'a [IpNet],
    own: &'a [IpNet],
}

impl Trusted<'_> {
    fn contains(&self, n: &IpNet) -> bool {
        self.operator
            .iter()
            .chain(self.own)
            .any(|t| t.contains(&n.addr()))
    }
}

/// A host's reachable addresses: `spec.addresses` (from an administrator, or the Node) and the
/// reported interface addresses that lie within `trusted`.
fn host_addresses(
    name: &str,
    host: &Host,
    facts: Option<&HostFacts>,
    trusted: Trusted<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut untrusted = Vec::new();
    let mut invalid = |field: String, m: String| {
        diags.push(Diagnostic {
            kind: ObjectKind::Host,
            name: name.to_string(),
            field,
            reason: Reason::InvalidAddress,
            message: format!("{m}; address ignored"),
            severity: Severity::Error,
        })
    };
    for (i, a) in host.spec.addresses.iter().enumerate() {
        match parse_host_address(a) {
            Ok(Some(n)) => out.push(n),
            Ok(None) => {}
            Err(m) => invalid(format!("spec.addresses[{i}]"), m),
        }
    }
    // a reported address that repeats spec.addresses is neither new nor untrusted (compared
    // with those few only: an agent may report thousands)
    let from_spec = out.len();
    for (i, iface) in facts.iter().flat_map(|f| f.interfaces.iter()).enumerate() {
        for (j, a) in iface.addresses.iter().enumerate() {
            match parse_host_address(a) {
                Ok(Some(n)) if out[..from_spec].contains(&n) => {}
                Ok(Some(n)) if trusted.contains(&n) => out.push(n),
                Ok(Some(n)) => untrusted.push(n),
                Ok(None) => {}
                Err(m) => invalid(format!("status.interfaces[{i}].addresses[{j}]"), m),
            }
        }
    }
    if !untrusted.is_empty() {
        let listed: Vec<String> = untrusted
            .iter()
            .take(UNTRUSTED_LISTED)
            .map(|n| n.addr().to_string())
            .collect();
        let more = untrusted.len().saturating_sub(UNTRUSTED_LISTED);
        diags.push(Diagnostic {
            kind: ObjectKind::Host,
            name: name.to_string(),
            field: "status.interfaces".into(),
            reason: Reason::UntrustedAddress,
            message: format!(
                "reported addresses not used, outside spec.trustReportedAddresses of the Host, its Groups and the operator: {}{}",
                listed.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ),
            severity: Severity::Warning,
        });
    }
    out
}
