//! Decides what to publish after a compile: a pure function of what each host was last sent and
//! what the compiler now wants.
//!
//! - A host whose rule documents (or the *names* of its sets) changed, or that was never sent
//!   anything, gets one full `Apply` with a new revision.
//! - A set whose content changed while the rules did not is sent ONCE as a shared-set update
//!   to every host using it (the broker fans it out), instead of once per host. Hosts whose
//!   copy is the content of the previous plan get only the change (added and removed members,
//!   checked by hash on both sides) when it is smaller than the set; the others the full set.
//! - Hosts in conflict, withheld or unmanaged get nothing: they keep their last applied rules.
//!
//! Revisions are `max(previous + 1, now in ms)`: monotonic per host, and a restarted or newly
//! elected operator that seeded its state from the hosts' reports continues above them without
//! sending anything when nothing changed.

use crate::core::compile::{Changes, Compiled, CompiledFirewall, HostOutcome};
use dog_protocol::messages::SetChange;
use dog_protocol::ruleset::{FirewallHashes, IpSet};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What one host was last sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub revision: u64,
    pub hashes: FirewallHashes,
    /// Hash of each set the host uses, by set name.
    pub set_hashes: BTreeMap<String, String>,
}

/// What was last sent to every host and every shared set, and which hosts the next plan must
/// look at besides those the compiler reports changed.
#[derive(Clone, Debug)]
pub struct PublishState {
    pub hosts: BTreeMap<String, Delivered>,
    /// Last version published per shared set.
    pub set_versions: BTreeMap<String, u64>,
    /// Every set as of the previous plan: the base a change is computed against.
    pub last_sets: BTreeMap<String, Arc<IpSet>>,
    /// Hosts to look at in the next plan whatever the compiler says: forgotten ones (a failed
    /// publish, a reconnect with other hashes, a new key) and ones that could not be sent to.
    revisit: BTreeSet<String>,
    /// The next plan looks at every host (the first one, after a start or takeover).
    everyone: bool,
}

impl Default for PublishState {
    fn default() -> Self {
        PublishState {
            hosts: BTreeMap::new(),
            set_versions: BTreeMap::new(),
            last_sets: BTreeMap::new(),
            revisit: BTreeSet::new(),
            everyone: true,
        }
    }
}

/// What turns `old` into `new` (both sorted and deduplicated, as [`IpSet::new`] keeps them),
/// as version `version` of the set.
pub fn set_change(old: &IpSet, new: &IpSet, version: u64) -> SetChange {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let (was, now) = (&old.members, &new.members);
    let (mut i, mut j) = (0, 0);
    loop {
        match (was.get(i), now.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                remove.push(*x);
                i += 1;
            }
            (Some(x), None) => {
                remove.push(*x);
                i += 1;
            }
            (_, Some(y)) => {
                add.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    SetChange {
        name: new.name.clone(),
        version,
        base_hash: old.hash(),
        hash: new.hash(),
        add,
        remove,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Publish {
    /// The host's full desired state, but for the sets in `kept` (name → hash), which the
    /// host holds already as they are now.
    Apply {
        host: String,
        revision: u64,
        firewall: Arc<CompiledFirewall>,
        kept: BTreeMap<String, String>,
    },
    /// New content of a set shared by `recipients`, sent once: the change from their copy
    /// when `change` is set, else the whole set.
    SharedSet {
        set: Arc<IpSet>,
        version: u64,
        recipients: Vec<String>,
        change: Option<SetChange>,
    },
}

impl PublishState {
    /// Records that `host` already runs `firewall` at `revision` (its report matched), so a new
    /// leader or a restarted operator sends nothing for it.
    pub fn seed(
        &mut self,
        host: &str,
        revision: u64,
        firewall: &CompiledFirewall,
        compiled: &Compiled,
    ) {
        self.hosts.insert(
            host.to_string(),
            delivered(revision, firewall, &compiled.set_hashes),
        );
    }

    /// Forgets what `host` was sent, so the next plan sends its full state (on reconnect with
    /// different hashes, on a failed apply, on persistent drift).
    pub fn forget(&mut self, host: &str) {
        self.hosts.remove(host);
        self.revisit.insert(host.to_string());
    }

    pub fn revision(&self, host: &str) -> Option<u64> {
        self.hosts.get(host).map(|d| d.revision)
    }
}

fn set_hashes_of(
    fw: &CompiledFirewall,
    all: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    fw.sets
        .keys()
        .map(|n| (n.clone(), all.get(n).cloned().unwrap_or_default()))
        .collect()
}

fn delivered(revision: u64, fw: &CompiledFirewall, all: &BTreeMap<String, String>) -> Delivered {
    Delivered {
        revision,
        hashes: fw.hashes(),
        set_hashes: set_hashes_of(fw, all),
    }
}

/// Hosts that need only a set update, by set name, with the hash of each one's copy.
type SetRecipients = BTreeMap<String, Vec<(String, Option<String>)>>;

/// Plans the publishes that bring every reachable host to `compiled`, updating `state` as if
/// they were all delivered. Only the hosts `changed` names (what the compiler reported since
/// the last plan) and those `state` keeps to revisit are looked at: the others already run
/// what was delivered. `reachable` says whether a host can be sent to (its keys are known).
pub fn plan(
    state: &mut PublishState,
    compiled: &Compiled,
    changed: &Changes,
    reachable: &dyn Fn(&str) -> bool,
    now_ms: u64,
) -> Vec<Publish> {
    let mut out = Vec::new();
    let mut set_recipients = SetRecipients::new();
    let candidates: Vec<String> = if std::mem::take(&mut state.everyone) {
        state.revisit.clear();
        compiled.hosts.keys().cloned().collect()
    } else {
        let mut c = std::mem::take(&mut state.revisit);
        c.extend(changed.hosts.iter().cloned());
        c.into_iter().collect()
    };
    for host in &candidates {
        let Some(HostOutcome::Firewall { firewall, .. }) = compiled.hosts.get(host) else {
            continue;
        };
        if !reachable(host) {
            // looked at again once it can be sent to
            state.revisit.insert(host.clone());
            continue;
        }
        out.extend(plan_host(
            state,
            compiled,
            host,
            firewall,
            now_ms,
            &mut set_recipients,
        ));
    }
    for (name, recipients) in set_recipients {
        out.extend(plan_set(
            state, compiled, changed, &name, recipients, now_ms,
        ));
    }
    state.last_sets = compiled.sets.clone();
    // Hosts that vanished from the compile keep their entry only while they still exist.
    let known: BTreeSet<&String> = compiled.hosts.keys().collect();
    state.hosts.retain(|h, _| known.contains(h));
    out
}

/// One host's part of a plan: a whole Apply when its rules or its list of sets changed (the
/// sets it holds as they are now go by name and hash only), else its name added to the
/// recipients of each of its sets whose content changed.
fn plan_host(
    state: &mut PublishState,
    compiled: &Compiled,
    host: &str,
    firewall: &Arc<CompiledFirewall>,
    now_ms: u64,
    set_recipients: &mut SetRecipients,
) -> Option<Publish> {
    let prev = state.hosts.get(host);
    let rules_changed = match prev {
        None => true,
        Some(p) => {
            p.hashes.ipv4_rules != firewall.hashes.ipv4_rules
                || p.hashes.ipv6_rules != firewall.hashes.ipv6_rules
                || !p.set_hashes.keys().eq(firewall.sets.keys())
        }
    };
    if rules_changed {
        let revision = next_revision(prev.map(|p| p.revision), now_ms);
        let kept: BTreeMap<String, String> = prev
            .map(|p| {
                firewall
                    .sets
                    .keys()
                    .filter_map(|n| {
                        let h = compiled.set_hashes.get(n)?;
                        (p.set_hashes.get(n) == Some(h)).then(|| (n.clone(), h.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        state.hosts.insert(
            host.to_string(),
            delivered(revision, firewall, &compiled.set_hashes),
        );
        return Some(Publish::Apply {
            host: host.to_string(),
            revision,
            firewall: firewall.clone(),
            kept,
        });
    }
    let prev = state.hosts.get_mut(host)?;
    let mut any = false;
    for name in firewall.sets.keys() {
        let h = compiled.set_hashes.get(name).cloned().unwrap_or_default();
        if prev.set_hashes.get(name) != Some(&h) {
            let copy = prev.set_hashes.insert(name.clone(), h);
            set_recipients
                .entry(name.clone())
                .or_default()
                .push((host.to_string(), copy));
            any = true;
        }
    }
    if any {
        prev.hashes = firewall.hashes();
    }
    None
}

/// The publishes of one changed set: the change, for the hosts that hold the previous content,
/// when it is the smaller message (as the compiler found it when it is against that content,
/// else a merge), and the whole set for the others.
fn plan_set(
    state: &mut PublishState,
    compiled: &Compiled,
    changed: &Changes,
    name: &str,
    recipients: Vec<(String, Option<String>)>,
    now_ms: u64,
) -> Vec<Publish> {
    let Some(set) = compiled.sets.get(name) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let version = next_revision(state.set_versions.get(name).copied(), now_ms);
    state.set_versions.insert(name.to_string(), version);
    let base = state.last_sets.get(name);
    let base_hash = base.map(|b| b.hash());
    let (on_base, others): (Vec<_>, Vec<_>) = recipients
        .into_iter()
        .partition(|(_, copy)| copy.is_some() && *copy == base_hash);
    let new_hash = compiled.set_hashes.get(name).cloned().unwrap_or_default();
    let change = base
        .filter(|_| !on_base.is_empty())
        .map(|b| match changed.set_diffs.get(name) {
            Some(d) if Some(&d.base_hash) == base_hash.as_ref() => SetChange {
                name: name.to_string(),
                version,
                base_hash: d.base_hash.clone(),
                hash: new_hash.clone(),
                add: d.add.clone(),
                remove: d.remove.clone(),
            },
            _ => set_change(b, set, version),
        })
        .filter(|c| c.add.len() + c.remove.len() < set.members.len());
    let hosts = |v: Vec<(String, Option<String>)>| v.into_iter().map(|(h, _)| h).collect();
    let full: Vec<String> = match change {
        Some(change) => {
            out.push(Publish::SharedSet {
                set: set.clone(),
                version,
                recipients: hosts(on_base),
                change: Some(change),
            });
            hosts(others)
        }
        None => hosts(on_base.into_iter().chain(others).collect()),
    };
    if !full.is_empty() {
        out.push(Publish::SharedSet {
            set: set.clone(),
            version,
            recipients: full,
            change: None,
        });
    }
    out
}

/// `max(previous + 1, now_ms)`: monotonic, and above anything a previous operator sent.
pub fn next_revision(previous: Option<u64>, now_ms: u64) -> u64 {
    previous.map_or(now_ms, |p| (p + 1).max(now_ms))
}

#[cfg(test)]
mod tests;
