//! The outcome phase, which `Compiler::run` calls after the firewalls: each touched host's
//! outcome, and the firewall swapped in for each host of a group whose firewall changed.

use super::*;

impl Compiler {
    /// Each touched host's outcome, and the firewall of each host of a group whose firewall
    /// changed; returns the hosts whose outcome changed.
    pub(super) fn outcome_phase(&mut self, d: &Dirty) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        // read while the outcomes are written; put back below
        let running = std::mem::take(&mut self.running);
        let swapped = d.swaps.iter().flat_map(|g| {
            running
                .get(g)
                .into_iter()
                .flatten()
                .filter(|h| !d.outcomes.contains(*h))
                .map(move |h| (h, Some(g)))
        });
        let hosts: Vec<(&String, Option<&String>)> = d
            .outcomes
            .iter()
            .map(|h| (h, None))
            .chain(swapped)
            .collect();
        for (h, group) in hosts {
            match self.swap_firewall(h, group) {
                Swap::Done(true) => {
                    changed.insert(h.clone());
                }
                Swap::Done(false) => {}
                Swap::Other => self.settle_outcome(h, &mut changed),
            }
        }
        self.running = running;
        changed
    }

    /// A host that keeps its group and profile only has its firewall swapped in place (a new
    /// firewall allocation is made only for new hashes). `group` is the one the caller knows
    /// the host runs, so its resolution need not be read.
    fn swap_firewall(&mut self, h: &str, group: Option<&String>) -> Swap {
        let resolved = match group {
            Some(g) => Some((g, None)),
            None => match self.hosts.get(h) {
                Some(HostBuild {
                    resolution: Resolution::Runs { group, profile },
                    ..
                }) => Some((group, Some(profile))),
                _ => None,
            },
        };
        let Some((group, profile)) = resolved else {
            return Swap::Other;
        };
        let Some(e) = self.firewalls.by_group.get(group) else {
            return Swap::Other;
        };
        let Some(HostOutcome::Firewall {
            group: g,
            profile: p,
            firewall,
        }) = self.out.hosts.get_mut(h)
        else {
            return Swap::Other;
        };
        if g != group || *p != e.fw.profile || profile.is_some_and(|r| r != p) {
            return Swap::Other;
        }
        if Arc::ptr_eq(firewall, &e.fw) {
            return Swap::Done(false);
        }
        *firewall = e.fw.clone();
        Swap::Done(true)
    }

    /// Recomputes `h`'s outcome from its resolution; adds it to `changed` when it differs.
    fn settle_outcome(&mut self, h: &str, changed: &mut BTreeSet<String>) {
        let outcome = self.hosts.get(h).map(|b| match &b.resolution {
            Resolution::Unmanaged => HostOutcome::Unmanaged,
            Resolution::Conflict { groups } => HostOutcome::Conflict {
                groups: groups.clone(),
            },
            Resolution::Runs { group, profile } => match self.firewalls.by_group.get(group) {
                Some(e) => HostOutcome::Firewall {
                    group: group.clone(),
                    profile: profile.clone(),
                    firewall: e.fw.clone(),
                },
                None => HostOutcome::Withheld {
                    group: group.clone(),
                    profile: profile.clone(),
                },
            },
        });
        let old = match outcome {
            Some(o) => self.out.hosts.insert(h.to_string(), o),
            None => self.out.hosts.remove(h),
        };
        let same = match (&old, self.out.hosts.get(h)) {
            (Some(a), Some(b)) => same_outcome(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            changed.insert(h.to_string());
        }
    }
}

/// What [`Compiler::swap_firewall`] did: put the group's firewall in place (true when it was
/// another one), or found a host whose outcome must be computed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Swap {
    Done(bool),
    Other,
}
