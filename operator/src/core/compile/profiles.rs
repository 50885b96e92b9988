//! A Profile rendered for the groups that run it: once per group (the `Self` peer is the
//! group's own set), and checked even when no group runs it, so its status tells the truth
//! before it is used.

use super::render::{render_profile, RenderedProfile};
use super::setname::SetSource;
use super::validate::RefCheck;
use super::Diagnostic;
use crate::crd::{PeerKind, Profile};
use dog_protocol::ruleset::Failsafe;
use std::collections::{BTreeMap, BTreeSet};

/// One profile's rendering.
#[derive(Clone, Debug, Default)]
pub(super) struct ProfileBuild {
    /// The Groups and Zones its rules name (whose existence decides how it renders).
    pub refs: BTreeSet<(SetSource, String)>,
    /// The documents, by group; empty when the profile has an error.
    pub rendered: BTreeMap<String, RenderedProfile>,
    /// Errors (the profile is withheld) and warnings (it applies, not as written).
    pub diags: Vec<Diagnostic>,
    pub valid: bool,
}

/// The Groups and Zones named by `profile`'s rules.
pub(super) fn named_sources(profile: &Profile) -> BTreeSet<(SetSource, String)> {
    profile
        .spec
        .inbound
        .iter()
        .chain(&profile.spec.outbound)
        .filter_map(|r| {
            let src = match r.peer.kind {
                PeerKind::Group => SetSource::Group,
                PeerKind::Zone => SetSource::Zone,
                _ => return None,
            };
            r.peer.name.clone().map(|n| (src, n))
        })
        .collect()
}

/// Renders `profile` for `groups` (the groups naming it, sorted), of which `running` have
/// hosts running them. A profile no group runs is rendered for its first group, or with a
/// placeholder own group when no group names it, so that its problems are known.
pub(super) fn build(
    name: &str,
    profile: &Profile,
    groups: &[String],
    running: &dyn Fn(&str) -> bool,
    failsafe: &Failsafe,
    refs: RefCheck<'_>,
) -> ProfileBuild {
    let mut targets: Vec<&str> = groups
        .iter()
        .map(String::as_str)
        .filter(|g| running(g))
        .collect();
    if targets.is_empty() {
        targets.push(groups.first().map(String::as_str).unwrap_or(""));
    }
    let mut out = ProfileBuild {
        refs: named_sources(profile),
        valid: true,
        ..Default::default()
    };
    for g in targets {
        let placeholder = g.is_empty();
        let check = |src: SetSource, n: &str| {
            if placeholder && src == SetSource::Group && n.is_empty() {
                Ok(())
            } else {
                refs(src, n)
            }
        };
        match render_profile(name, profile, g, failsafe, &check) {
            Ok(r) => {
                out.diags.extend(r.warnings.iter().cloned());
                if !placeholder {
                    out.rendered.insert(g.to_string(), r);
                }
            }
            Err(errors) => {
                out.diags.extend(errors);
                out.rendered.clear();
                out.valid = false;
                break;
            }
        }
    }
    out
}
