//! The firewall each group's hosts run (its rendered documents plus the current sets it
//! references), which Groups and Zones each firewall uses, and the registry of every set in
//! use with its hash, kept as firewalls come and go.

use super::render::RenderedProfile;
use super::setname::{set_name, SetSource};
use super::{Compiled, CompiledFirewall, SetPair};
use dog_protocol::ruleset::{sets_hash, Failsafe, Family, FirewallHashes, IpSet, RulesDocument};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A group's firewall and the sources whose sets it references.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub fw: Arc<CompiledFirewall>,
    pub sources: Arc<BTreeSet<(SetSource, String)>>,
    /// The hash of each of `fw.sets`, in the map's order (what the combined hash covers).
    set_hashes: Arc<[Arc<str>]>,
}

#[derive(Debug, Default)]
pub(super) struct Firewalls {
    pub by_group: BTreeMap<String, Entry>,
    /// Source → groups whose firewall references its sets.
    pub users: BTreeMap<(SetSource, String), BTreeSet<String>>,
    /// Set name → how many firewalls reference it.
    used: HashMap<String, u32>,
    /// Set name → the set and its hash, so an unchanged set is hashed once.
    hashes: HashMap<String, (Arc<IpSet>, Arc<str>)>,
}

impl Firewalls {
    /// The hash of `set`, computed once per allocation: a set is a new allocation only when
    /// its Group or Zone was recomputed, and comparing it member by member with the last one
    /// costs as much as hashing it.
    fn hash_of(&mut self, set: &Arc<IpSet>) -> Arc<str> {
        if let Some((old, h)) = self.hashes.get(&set.name) {
            if Arc::ptr_eq(old, set) {
                return h.clone();
            }
        }
        let h: Arc<str> = set.hash().into();
        self.hashes
            .insert(set.name.clone(), (set.clone(), h.clone()));
        h
    }

    /// The firewall of `group` running `profile` from its rendering, with the sets `pair_of`
    /// gives for each source it references (an empty set for a source without one). Reuses
    /// `previous` (the same allocation) when nothing differs.
    pub fn make(
        &mut self,
        group: &str,
        profile: &str,
        rendered: &RenderedProfile,
        failsafe: &Arc<Failsafe>,
        previous: Option<&Entry>,
        pair_of: &dyn Fn(SetSource, &str) -> Option<SetPair>,
    ) -> Entry {
        let reuse = |old: &Arc<RulesDocument>, new: &RulesDocument| {
            if **old == *new {
                old.clone()
            } else {
                Arc::new(new.clone())
            }
        };
        let (ipv4, ipv6) = match previous {
            Some(p) => (
                reuse(&p.fw.ipv4, &rendered.ipv4),
                reuse(&p.fw.ipv6, &rendered.ipv6),
            ),
            None => (
                Arc::new(rendered.ipv4.clone()),
                Arc::new(rendered.ipv6.clone()),
            ),
        };
        let mut sets = BTreeMap::new();
        for (src, name) in &rendered.sources {
            for set in current_sets(*src, name, pair_of) {
                sets.insert(set.name.clone(), set);
            }
        }
        let set_hashes: Arc<[Arc<str>]> = sets.values().map(|s| self.hash_of(s)).collect();
        // a document kept from the previous firewall keeps its hash
        let rules_hash = |doc: &Arc<RulesDocument>, f: Family| match previous {
            Some(p) if Arc::ptr_eq(p.fw.document_arc(f), doc) => p.fw.hashes.rules(f).to_string(),
            _ => doc.hash(),
        };
        let hashes = FirewallHashes {
            ipv4_rules: rules_hash(&ipv4, Family::V4),
            ipv6_rules: rules_hash(&ipv6, Family::V6),
            sets: combined_hash(&sets, &set_hashes),
        };
        let fw = CompiledFirewall {
            group: group.to_string(),
            profile: profile.to_string(),
            ipv4,
            ipv6,
            sets,
            failsafe: Arc::clone(failsafe),
            hashes,
        };
        // the hashes cover every document and set, so equal hashes are equal content (and
        // no set is compared member by member)
        let fw = match previous {
            Some(p)
                if p.fw.hashes == fw.hashes
                    && p.fw.group == fw.group
                    && p.fw.profile == fw.profile =>
            {
                p.fw.clone()
            }
            _ => Arc::new(fw),
        };
        let sources = match previous {
            Some(p) if *p.sources == rendered.sources => p.sources.clone(),
            _ => Arc::new(rendered.sources.clone()),
        };
        Entry {
            fw,
            sources,
            set_hashes,
        }
    }

    /// `previous` with the current sets of `changed` sources in place of the ones it held:
    /// for a group whose rendering did not change, only sets moved. Its documents, other
    /// sets and their hashes are kept; only the combined hash is computed again.
    pub fn refresh(
        &mut self,
        previous: &Entry,
        changed: &[(SetSource, String)],
        pair_of: &dyn Fn(SetSource, &str) -> Option<SetPair>,
    ) -> Entry {
        let mut sets = previous.fw.sets.clone();
        let mut hashes: Vec<Arc<str>> = previous.set_hashes.to_vec();
        let mut moved = false;
        for (src, name) in changed {
            for set in current_sets(*src, name, pair_of) {
                let Some((i, (_, slot))) = sets
                    .iter_mut()
                    .enumerate()
                    .find(|(_, (n, _))| **n == set.name)
                else {
                    continue;
                };
                if !Arc::ptr_eq(slot, &set) {
                    hashes[i] = self.hash_of(&set);
                    *slot = set;
                    moved = true;
                }
            }
        }
        if !moved || *hashes == *previous.set_hashes {
            return previous.clone();
        }
        let combined = combined_hash(&sets, &hashes);
        let fw = CompiledFirewall {
            group: previous.fw.group.clone(),
            profile: previous.fw.profile.clone(),
            ipv4: previous.fw.ipv4.clone(),
            ipv6: previous.fw.ipv6.clone(),
            sets,
            failsafe: previous.fw.failsafe.clone(),
            hashes: FirewallHashes {
                sets: combined,
                ..previous.fw.hashes.clone()
            },
        };
        Entry {
            fw: Arc::new(fw),
            sources: previous.sources.clone(),
            set_hashes: hashes.into(),
        }
    }

    /// Puts `entry` in place of `group`'s firewall (`None` removes it), keeping the users and
    /// `out.sets` current; true when the group's hosts now run something else. Set names whose
    /// set or use changed are added to `touched`.
    pub fn install(
        &mut self,
        group: &str,
        entry: Option<Entry>,
        out: &mut Compiled,
        touched: &mut BTreeSet<String>,
    ) -> bool {
        // the common case, new set contents under the same names: only the sets that are
        // other allocations now are written (no users or use counts change)
        if let (Some(o), Some(e)) = (self.by_group.get_mut(group), &entry) {
            let same_sources = Arc::ptr_eq(&o.sources, &e.sources) || o.sources == e.sources;
            if same_sources && o.fw.sets.keys().eq(e.fw.sets.keys()) {
                for ((name, was), (_, now)) in o.fw.sets.iter().zip(&e.fw.sets) {
                    if !Arc::ptr_eq(was, now) {
                        out.sets.insert(name.clone(), now.clone());
                        touched.insert(name.clone());
                    }
                }
                let changed = !Arc::ptr_eq(&o.fw, &e.fw);
                o.fw = e.fw.clone();
                o.set_hashes = e.set_hashes.clone();
                return changed;
            }
        }
        let old = self.by_group.remove(group);
        if let Some(o) = &old {
            for s in o.sources.iter() {
                if let Some(u) = self.users.get_mut(s) {
                    u.remove(group);
                    if u.is_empty() {
                        self.users.remove(s);
                    }
                }
            }
            for name in o.fw.sets.keys() {
                if let Some(n) = self.used.get_mut(name) {
                    *n -= 1;
                    if *n == 0 {
                        self.used.remove(name);
                        out.sets.remove(name);
                    }
                }
                touched.insert(name.clone());
            }
        }
        if let Some(e) = &entry {
            for s in e.sources.iter() {
                self.users
                    .entry(s.clone())
                    .or_default()
                    .insert(group.to_string());
            }
            for (name, set) in &e.fw.sets {
                *self.used.entry(name.clone()).or_default() += 1;
                out.sets.insert(name.clone(), set.clone());
                touched.insert(name.clone());
            }
        }
        let changed = match (&old, &entry) {
            (Some(o), Some(n)) => !Arc::ptr_eq(&o.fw, &n.fw),
            (None, None) => false,
            _ => true,
        };
        if let Some(e) = entry {
            self.by_group.insert(group.to_string(), e);
        }
        changed
    }

    /// Brings `out.set_hashes` up to date for `touched` set names; returns the names whose
    /// hash changed, appeared or disappeared.
    pub fn settle(&mut self, touched: &BTreeSet<String>, out: &mut Compiled) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for name in touched {
            let new = match out.sets.get(name).cloned() {
                Some(set) => Some(self.hash_of(&set).to_string()),
                None => {
                    self.hashes.remove(name);
                    None
                }
            };
            let old = match &new {
                Some(h) => out.set_hashes.insert(name.clone(), h.clone()),
                None => out.set_hashes.remove(name),
            };
            if old != new {
                changed.insert(name.clone());
            }
        }
        changed
    }
}

/// The combined hash of `sets` whose hashes are `hashes`, in the same (name) order.
fn combined_hash(sets: &BTreeMap<String, Arc<IpSet>>, hashes: &[Arc<str>]) -> String {
    sets_hash(
        sets.keys()
            .map(String::as_str)
            .zip(hashes.iter().map(|h| &**h)),
    )
}

/// The current sets of a Group or Zone in both families; empty ones under its set names when
/// `pair_of` has none (an unknown peer matches nothing).
fn current_sets(
    src: SetSource,
    name: &str,
    pair_of: &dyn Fn(SetSource, &str) -> Option<SetPair>,
) -> [Arc<IpSet>; 2] {
    let pair = pair_of(src, name);
    Family::BOTH.map(|f| match &pair {
        Some(p) => p.get(f).clone(),
        None => Arc::new(IpSet::new(set_name(src, name, f), f, [])),
    })
}
