//! A Group's two sets: the addresses of its members that are not retired, plus its extra
//! addresses; and what is wrong with the addresses its spec lists.

use super::addresses::parse_entry;
use super::hosts::HostBuild;
use super::setname::{set_name, SetSource};
use super::{Diagnostic, ObjectKind, Reason, SetPair, Severity};
use crate::crd::Group;
use dog_protocol::ruleset::{Family, IpSet};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A group's sets and the diagnostics of its address lists.
#[derive(Clone, Debug)]
pub(super) struct GroupBuild {
    pub pair: SetPair,
    pub diags: Vec<Diagnostic>,
}

pub(super) fn build(
    name: &str,
    group: &Group,
    members: Option<&BTreeSet<String>>,
    hosts: &BTreeMap<String, HostBuild>,
) -> GroupBuild {
    let mut nets: Vec<IpNet> = members
        .into_iter()
        .flatten()
        .filter_map(|h| hosts.get(h))
        .filter(|h| !h.retired)
        .flat_map(|h| h.addrs.iter().copied())
        .collect();
    let mut diags = Vec::new();
    let diag = |field: String, reason, message, severity| Diagnostic {
        kind: ObjectKind::Group,
        name: name.to_string(),
        field,
        reason,
        message,
        severity,
    };
    for (i, a) in group.spec.trust_reported_addresses.iter().enumerate() {
        if let Err(m) = parse_entry(a) {
            diags.push(diag(
                format!("spec.trustReportedAddresses[{i}]"),
                Reason::InvalidAddress,
                format!("{m}; entry ignored"),
                Severity::Error,
            ));
        }
    }
    for (i, a) in group.spec.extra_addresses.iter().enumerate() {
        match parse_entry(a) {
            Ok(n) => {
                if n.trunc() != n {
                    diags.push(diag(
                        format!("spec.extraAddresses[{i}]"),
                        Reason::HostBitsSet,
                        format!("`{a}` has host bits set; applied as {}", n.trunc()),
                        Severity::Warning,
                    ));
                }
                nets.push(n)
            }
            Err(m) => diags.push(diag(
                format!("spec.extraAddresses[{i}]"),
                Reason::InvalidAddress,
                m,
                Severity::Error,
            )),
        }
    }
    GroupBuild {
        pair: pair_of(SetSource::Group, name, nets),
        diags,
    }
}

/// Both sets of a Group or Zone from arbitrary members (canonicalised by [`IpSet::new`]).
pub(super) fn pair_of(src: SetSource, name: &str, nets: Vec<IpNet>) -> SetPair {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
        nets.into_iter().partition(|n| Family::of(n) == Family::V4);
    SetPair {
        v4: Arc::new(IpSet::new(set_name(src, name, Family::V4), Family::V4, v4)),
        v6: Arc::new(IpSet::new(set_name(src, name, Family::V6), Family::V6, v6)),
    }
}
