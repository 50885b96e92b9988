//! The compiler as it runs in the operator: it keeps the last inputs and everything derived
//! from them, and takes changes object by object ([`Edit`]). Each change marks what depends on
//! it, and [`Compiler::apply`] recomputes only that, in named phases:
//!
//! ```text
//! zones ─▶ set names ─▶ group index ─▶ hosts ─▶ group sets ─▶ profiles ─▶ firewalls ─▶ outcomes
//!   (a zone's sets)  (collisions)  (memberships)  (resolution,   (members'    (rendered    (sets swapped  (per host)
//!                                                  addresses)     addresses)   per group)   in)
//! ```
//!
//! A full compile is the same phases with everything marked ([`Compiler::load`]), so the two
//! cannot disagree; a property test checks that any sequence of changes applied one by one
//! gives exactly what a full compile of the same history gives. Rendering is per group, sets
//! are shared by `Arc` between firewalls, and an unchanged firewall keeps its allocation, so
//! "did this host's firewall change" is a pointer comparison.

use super::firewalls::Firewalls;
use super::groups::{self, GroupBuild};
use super::hosts::{self, HostBuild};
use super::profiles::{self, ProfileBuild};
use super::resolve::{is_member_of, GroupIndex, Resolution};
use super::setname::{set_name, SetSource};
use super::validate::RefProblem;
use super::zones::{Moved, ZoneBuild};
use super::{
    CompileOptions, Compiled, Diagnostic, GroupSummary, HostFacts, HostOutcome, ObjectKind,
    ProfileSummary, Reason, SetPair, Severity, Snapshot,
};
use crate::crd::{ConfigMapAddressSource, Group, Host, Profile, Zone};
use dog_protocol::ruleset::Family;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// More changed groups than this in one call recompute every host's memberships through the
/// index instead of checking each changed group against every host.
const MANY_GROUPS: usize = 8;

/// What a call changed: hosts whose outcome or firewall changed, and sets whose content
/// changed (or that appeared or disappeared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub hosts: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    /// For sets whose change is known member by member (a Zone's entries edited): the members
    /// added and removed, and the hash of the content they change.
    pub set_diffs: BTreeMap<String, SetDiff>,
    /// Whether everything was recomputed ([`Compiler::load`]).
    pub full: bool,
}

impl Changes {
    /// Folds a later call's changes into these (what a publish that comes after several
    /// compiles must cover). A set changed twice keeps a member-by-member change only when the
    /// second starts from where the first ended.
    pub fn absorb(&mut self, later: Changes) {
        self.hosts.extend(later.hosts);
        self.full |= later.full;
        for name in &later.sets {
            if let Some(first) = self.set_diffs.remove(name) {
                if let Some(second) = later.set_diffs.get(name) {
                    if let Some(both) = first.then(second) {
                        self.set_diffs.insert(name.clone(), both);
                    }
                }
            } else if !self.sets.contains(name) {
                if let Some(d) = later.set_diffs.get(name) {
                    self.set_diffs.insert(name.clone(), d.clone());
                }
            }
        }
        self.sets.extend(later.sets);
    }
}

/// The members a set gained and lost, against the content whose hash is `base_hash`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetDiff {
    pub base_hash: String,
    /// The hash once the change is made.
    pub hash: String,
    pub add: Vec<IpNet>,
    pub remove: Vec<IpNet>,
}

impl SetDiff {
    /// This change followed by `next` (which must start where this one ends), as one change.
    fn then(self, next: &SetDiff) -> Option<SetDiff> {
        if next.base_hash != self.hash {
            return None;
        }
        let removed_now: BTreeSet<&IpNet> = next.remove.iter().collect();
        let added_now: BTreeSet<&IpNet> = next.add.iter().collect();
        let mut add: BTreeSet<IpNet> = self
            .add
            .iter()
            .filter(|m| !removed_now.contains(m))
            .copied()
            .collect();
        let mut remove: BTreeSet<IpNet> = self
            .remove
            .iter()
            .filter(|m| !added_now.contains(m))
            .copied()
            .collect();
        let first_removed: BTreeSet<&IpNet> = self.remove.iter().collect();
        let first_added: BTreeSet<&IpNet> = self.add.iter().collect();
        add.extend(next.add.iter().filter(|m| !first_removed.contains(m)));
        remove.extend(next.remove.iter().filter(|m| !first_added.contains(m)));
        Some(SetDiff {
            base_hash: self.base_hash,
            hash: next.hash.clone(),
            add: add.into_iter().collect(),
            remove: remove.into_iter().collect(),
        })
    }
}

/// One change of the compiler's input: the new version of an object, or `None` when it is gone.
#[derive(Clone, Debug)]
pub enum Edit {
    Zone(String, Option<Arc<Zone>>),
    Host(String, Option<Arc<Host>>),
    Group(String, Option<Arc<Group>>),
    Profile(String, Option<Arc<Profile>>),
    /// The address lines of a ConfigMap key (`namespace/name/key`).
    ConfigMap(String, Option<Arc<Vec<String>>>),
    /// What the operator knows of a host at run time.
    Facts(String, Option<HostFacts>),
    /// An object used in its last good version (its source no longer loads), with the error.
    Stale(ObjectKind, String, Option<String>),
}

/// Who reported a diagnostic: each producer's list is replaced as a whole when it is redone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Producer {
    Zone(String),
    SetNames,
    Host(String),
    GroupSet(String),
    GroupProfile(String),
    Profile(String),
    Stale,
}

/// What the recorded edits invalidated, phase by phase.
#[derive(Debug, Default)]
struct Dirty {
    full: bool,
    /// Zones whose members changed entry by entry: (added, removed), both families.
    zone_moves: BTreeMap<String, (Vec<IpNet>, Vec<IpNet>)>,
    zones: BTreeSet<String>,
    /// A Group or Zone appeared or disappeared: set names may collide differently.
    names: bool,
    /// Groups and Zones whose usability as a rule's peer changed (existence, collision).
    refs: BTreeSet<(SetSource, String)>,
    groups: BTreeSet<String>,
    hosts: BTreeSet<String>,
    group_sets: BTreeSet<String>,
    group_profiles: BTreeSet<String>,
    profiles: BTreeSet<String>,
    sets: BTreeSet<(SetSource, String)>,
    firewalls: BTreeSet<String>,
    outcomes: BTreeSet<String>,
    group_summaries: BTreeSet<String>,
    profile_summaries: BTreeSet<String>,
    stale: bool,
}

/// The set names of every Group and Zone, and those that collide.
#[derive(Debug, Default)]
struct SetNames {
    names: BTreeMap<(SetSource, String), [String; 2]>,
    colliding: BTreeSet<(SetSource, String)>,
}

/// Incremental compiler; see the module docs.
#[derive(Debug, Default)]
pub struct Compiler {
    opts: CompileOptions,
    /// `opts.failsafe`, shared by every firewall.
    failsafe: Arc<dog_protocol::ruleset::Failsafe>,
    snap: Snapshot,
    zones: BTreeMap<String, ZoneBuild>,
    set_names: SetNames,
    index: GroupIndex,
    hosts: BTreeMap<String, HostBuild>,
    /// Group → its member hosts.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Group → the hosts running it (their resolution names it).
    running: BTreeMap<String, BTreeSet<String>>,
    /// Group → the profile it names, as last processed.
    group_profiles: BTreeMap<String, String>,
    /// Profile → the groups naming it.
    naming: BTreeMap<String, BTreeSet<String>>,
    groups: BTreeMap<String, GroupBuild>,
    profiles: BTreeMap<String, ProfileBuild>,
    /// Group or Zone → the profiles whose rules name it.
    referrers: BTreeMap<(SetSource, String), BTreeSet<String>>,
    firewalls: Firewalls,
    /// The last sets of Groups and Zones that no longer exist but that a rule still names: a
    /// DROP/REJECT rule keeps blocking these members (fail closed).
    remembered: BTreeMap<(SetSource, String), SetPair>,
    produced: BTreeMap<Producer, Vec<Diagnostic>>,
    out: Compiled,
}

pub fn config_map_key(r: &ConfigMapAddressSource) -> String {
    format!(
        "{}/{}/{}",
        r.namespace,
        r.name,
        r.key.as_deref().unwrap_or("addresses")
    )
}

fn labels_and_spec_eq(a: &Host, b: &Host) -> bool {
    a.metadata.labels == b.metadata.labels && a.spec == b.spec
}

/// The edits that turn the objects of `old` into those of `new`: every object that is not the
/// very same allocation ([`Compiler::apply`] then compares what the compiler reads of it, and
/// takes an unchanged one's newer metadata without recomputing anything).
fn diff_objects<T>(
    old: &BTreeMap<String, Arc<T>>,
    new: &BTreeMap<String, Arc<T>>,
    edit: impl Fn(String, Option<Arc<T>>) -> Edit,
    out: &mut Vec<Edit>,
) {
    for (name, b) in new {
        match old.get(name) {
            Some(a) if Arc::ptr_eq(a, b) => {}
            _ => out.push(edit(name.clone(), Some(b.clone()))),
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push(edit(name.clone(), None));
        }
    }
}

fn diff_values<T: PartialEq + Clone>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    edit: impl Fn(String, Option<T>) -> Edit,
    out: &mut Vec<Edit>,
) {
    for (name, b) in new {
        if old.get(name) != Some(b) {
            out.push(edit(name.clone(), Some(b.clone())));
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push(edit(name.clone(), None));
        }
    }
}

impl Compiler {
    pub fn new(opts: CompileOptions) -> Self {
        Compiler {
            failsafe: Arc::new(opts.failsafe.clone()),
            opts,
            ..Default::default()
        }
    }

    /// The current result.
    pub fn compiled(&self) -> &Compiled {
        &self.out
    }

    pub fn into_compiled(self) -> Compiled {
        self.out
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Moves to `snapshot` and recompiles everything (the reference the incremental path is
    /// held to; Groups and Zones that disappeared are remembered as by [`Compiler::apply`]).
    pub fn load(&mut self, snapshot: Snapshot) -> Changes {
        let edits = self.edits_to(&snapshot);
        self.snap.nodes = snapshot.nodes;
        self.run(edits, true)
    }

    /// Moves to `snapshot`, recomputing only what its differences from the current inputs
    /// touch. What a running operator calls with each new view of its source.
    pub fn update(&mut self, snapshot: Snapshot) -> Changes {
        let s = &self.snap;
        // the first call compiles everything, whichever way it is asked
        let first = s.zones.is_empty()
            && s.hosts.is_empty()
            && s.groups.is_empty()
            && s.profiles.is_empty();
        let edits = self.edits_to(&snapshot);
        self.snap.nodes = snapshot.nodes;
        self.run(edits, first)
    }

    /// Applies `edits` and recomputes what they touch.
    pub fn apply(&mut self, edits: impl IntoIterator<Item = Edit>) -> Changes {
        self.run(edits.into_iter().collect(), false)
    }

    /// The edits from the current inputs to `new`.
    fn edits_to(&self, new: &Snapshot) -> Vec<Edit> {
        let old = &self.snap;
        let mut out = Vec::new();
        diff_objects(&old.zones, &new.zones, Edit::Zone, &mut out);
        diff_objects(&old.hosts, &new.hosts, Edit::Host, &mut out);
        diff_objects(&old.groups, &new.groups, Edit::Group, &mut out);
        diff_objects(&old.profiles, &new.profiles, Edit::Profile, &mut out);
        diff_values(
            &old.config_map_addresses,
            &new.config_map_addresses,
            Edit::ConfigMap,
            &mut out,
        );
        diff_values(&old.facts, &new.facts, Edit::Facts, &mut out);
        for (key, m) in &new.stale {
            if old.stale.get(key) != Some(m) {
                out.push(Edit::Stale(key.0, key.1.clone(), Some(m.clone())));
            }
        }
        for key in old.stale.keys() {
            if !new.stale.contains_key(key) {
                out.push(Edit::Stale(key.0, key.1.clone(), None));
            }
        }
        out
    }

    // ---- recording: what each edit invalidates -----------------------------------------

    fn record(&mut self, edit: Edit, d: &mut Dirty) {
        match edit {
            Edit::Zone(name, zone) => {
                // a zone's entries are compared once, by the zone phase (they may be many)
                let old = self.snap.zones.get(&name);
                if let (Some(a), Some(b)) = (old, &zone) {
                    if Arc::ptr_eq(a, b) {
                        return;
                    }
                }
                if old.is_some() != zone.is_some() {
                    d.names = true;
                    d.refs.insert((SetSource::Zone, name.clone()));
                }
                put(&mut self.snap.zones, &name, zone);
                d.zones.insert(name);
            }
            Edit::ConfigMap(key, lines) => {
                let old = self.snap.config_map_addresses.get(&key);
                let same = match (old, &lines) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    return;
                }
                put(&mut self.snap.config_map_addresses, &key, lines);
                for (zname, z) in &self.snap.zones {
                    if z.spec
                        .config_map_refs
                        .iter()
                        .any(|r| config_map_key(r) == key)
                    {
                        d.zones.insert(zname.clone());
                    }
                }
            }
            Edit::Host(name, host) => {
                let old = self.snap.hosts.get(&name);
                if let (Some(a), Some(b)) = (old, &host) {
                    if Arc::ptr_eq(a, b) || labels_and_spec_eq(a, b) {
                        self.snap.hosts.insert(name, b.clone());
                        return;
                    }
                }
                put(&mut self.snap.hosts, &name, host);
                d.hosts.insert(name);
            }
            Edit::Facts(name, facts) => {
                if self.snap.facts.get(&name) == facts.as_ref() {
                    return;
                }
                put(&mut self.snap.facts, &name, facts);
                d.hosts.insert(name);
            }
            Edit::Group(name, group) => {
                let old = self.snap.groups.get(&name);
                if let (Some(a), Some(b)) = (old, &group) {
                    if Arc::ptr_eq(a, b) || a.spec == b.spec {
                        self.snap.groups.insert(name, b.clone());
                        return;
                    }
                }
                if old.is_some() != group.is_some() {
                    d.names = true;
                    d.refs.insert((SetSource::Group, name.clone()));
                }
                put(&mut self.snap.groups, &name, group);
                d.groups.insert(name);
            }
            Edit::Profile(name, profile) => {
                let old = self.snap.profiles.get(&name);
                if let (Some(a), Some(b)) = (old, &profile) {
                    if Arc::ptr_eq(a, b) || a.spec == b.spec {
                        self.snap.profiles.insert(name, b.clone());
                        return;
                    }
                }
                if old.is_some() != profile.is_some() {
                    // groups naming it say whether it exists
                    d.group_profiles
                        .extend(self.naming.get(&name).into_iter().flatten().cloned());
                }
                put(&mut self.snap.profiles, &name, profile);
                d.profiles.insert(name);
            }
            Edit::Stale(kind, name, message) => {
                let key = (kind, name);
                if self.snap.stale.get(&key) == message.as_ref() {
                    return;
                }
                match message {
                    Some(m) => self.snap.stale.insert(key, m),
                    None => self.snap.stale.remove(&key),
                };
                d.stale = true;
            }
        }
    }

    /// Marks everything (a full compile).
    fn mark_all(&self, d: &mut Dirty) {
        d.full = true;
        d.names = true;
        d.stale = true;
        let s = &self.snap;
        d.zones.extend(s.zones.keys().cloned());
        d.zones.extend(self.zones.keys().cloned());
        d.groups.extend(s.groups.keys().cloned());
        d.groups.extend(self.groups.keys().cloned());
        d.hosts.extend(s.hosts.keys().cloned());
        d.hosts.extend(self.hosts.keys().cloned());
        d.profiles.extend(s.profiles.keys().cloned());
        d.profiles.extend(self.profiles.keys().cloned());
    }

    /// Records `edits`, then runs the phases over what they touched.
    fn run(&mut self, edits: Vec<Edit>, full: bool) -> Changes {
        let mut d = Dirty::default();
        for e in edits {
            self.record(e, &mut d);
        }
        if full {
            self.mark_all(&mut d);
        }
        self.zone_phase(&mut d);
        self.names_phase(&mut d);
        self.group_phase(&mut d);
        self.host_phase(&mut d);
        self.group_set_phase(&mut d);
        self.group_profile_phase(&mut d);
        self.profile_phase(&mut d);
        // the hashes the member-by-member changes start from
        let hashes_before: BTreeMap<String, String> = d
            .zone_moves
            .keys()
            .flat_map(|z| Family::BOTH.map(|f| set_name(SetSource::Zone, z, f)))
            .filter_map(|n| self.out.set_hashes.get(&n).map(|h| (n, h.clone())))
            .collect();
        let sets = self.firewall_phase(&mut d);
        let set_diffs = self.set_diffs(&d, &sets, &hashes_before);
        let hosts = self.outcome_phase(&d);
        self.forget_phase();
        self.summary_phase(&d);
        if d.stale {
            let diags = self.stale_diagnostics();
            self.set_diags(Producer::Stale, diags);
        }
        Changes {
            hosts,
            sets,
            set_diffs,
            full: d.full,
        }
    }

    /// The member-by-member changes of the zones' sets in `changed`, per family.
    fn set_diffs(
        &self,
        d: &Dirty,
        changed: &BTreeSet<String>,
        before: &BTreeMap<String, String>,
    ) -> BTreeMap<String, SetDiff> {
        let mut out = BTreeMap::new();
        for (zone, (added, removed)) in &d.zone_moves {
            for f in Family::BOTH {
                let name = set_name(SetSource::Zone, zone, f);
                let (Some(base_hash), Some(hash)) =
                    (before.get(&name), self.out.set_hashes.get(&name))
                else {
                    continue;
                };
                if !changed.contains(&name) {
                    continue;
                }
                let pick = |v: &[IpNet]| v.iter().filter(|m| Family::of(m) == f).copied().collect();
                out.insert(
                    name,
                    SetDiff {
                        base_hash: base_hash.clone(),
                        hash: hash.clone(),
                        add: pick(added),
                        remove: pick(removed),
                    },
                );
            }
        }
        out
    }

    // ---- the phases ----------------------------------------------------------------------

    /// Zones: their sets, summaries and diagnostics. A deleted zone's sets are remembered.
    fn zone_phase(&mut self, d: &mut Dirty) {
        for name in std::mem::take(&mut d.zones) {
            let maps = &self.snap.config_map_addresses;
            match self.snap.zones.get(&name) {
                Some(zone) => {
                    let incremental = !d.full && self.zones.contains_key(&name);
                    let moved = match self.zones.get_mut(&name) {
                        Some(b) if incremental => b.update(&name, zone, maps),
                        old => {
                            let b = ZoneBuild::new(&name, zone, maps);
                            let same = old.is_some_and(|o| o.pair.same_content(&b.pair));
                            self.zones.insert(name.clone(), b);
                            if same {
                                Moved::Same
                            } else {
                                Moved::Rebuilt
                            }
                        }
                    };
                    let changed = moved != Moved::Same;
                    if let Moved::Members { added, removed } = moved {
                        d.zone_moves.insert(name.clone(), (added, removed));
                    }
                    let (summary, diags) = {
                        let b = &self.zones[&name];
                        (b.summary.clone(), b.diags.clone())
                    };
                    self.out.zones.insert(name.clone(), summary);
                    self.set_diags(Producer::Zone(name.clone()), diags);
                    if changed {
                        d.sets.insert((SetSource::Zone, name));
                    }
                }
                None => {
                    if let Some(b) = self.zones.remove(&name) {
                        self.remembered
                            .insert((SetSource::Zone, name.clone()), b.pair);
                    }
                    self.out.zones.remove(&name);
                    self.set_diags(Producer::Zone(name.clone()), Vec::new());
                    d.sets.insert((SetSource::Zone, name));
                }
            }
        }
    }

    /// Set names: every Group's and Zone's, and which collide (neither can be used).
    fn names_phase(&mut self, d: &mut Dirty) {
        if !d.names {
            return;
        }
        let sources: BTreeSet<(SetSource, String)> = self
            .snap
            .groups
            .keys()
            .map(|n| (SetSource::Group, n.clone()))
            .chain(self.snap.zones.keys().map(|n| (SetSource::Zone, n.clone())))
            .collect();
        let names = &mut self.set_names.names;
        names.retain(|k, _| sources.contains(k));
        for (src, name) in &sources {
            names
                .entry((*src, name.clone()))
                .or_insert_with(|| Family::BOTH.map(|f| set_name(*src, name, f)));
        }
        let mut owners: HashMap<&str, &(SetSource, String)> = HashMap::new();
        let mut colliding = BTreeSet::new();
        for (key, pair) in names.iter() {
            for n in pair {
                match owners.get(n.as_str()) {
                    Some(prev) if *prev != key => {
                        colliding.insert((*prev).clone());
                        colliding.insert(key.clone());
                    }
                    Some(_) => {}
                    None => {
                        owners.insert(n, key);
                    }
                }
            }
        }
        let old = std::mem::replace(&mut self.set_names.colliding, colliding);
        d.refs
            .extend(old.symmetric_difference(&self.set_names.colliding).cloned());
        let diags = self
            .set_names
            .colliding
            .iter()
            .map(|(src, name)| Diagnostic {
                kind: match src {
                    SetSource::Group => ObjectKind::Group,
                    SetSource::Zone => ObjectKind::Zone,
                },
                name: name.clone(),
                field: "metadata.name".into(),
                reason: Reason::SetNameCollision,
                message: format!(
                    "the ipset name derived from {src:?} `{name}` collides with another object's; rules referencing it are withheld"
                ),
                severity: Severity::Error,
            })
            .collect();
        self.set_diags(Producer::SetNames, diags);
    }

    /// Changed Groups: the index, which profile each names, and which hosts their change may
    /// move in or out (those hosts are redone next).
    fn group_phase(&mut self, d: &mut Dirty) {
        if d.groups.is_empty() {
            return;
        }
        self.index = GroupIndex::new(&self.snap.groups);
        let many = d.full || d.groups.len() > MANY_GROUPS;
        if many {
            d.hosts.extend(self.snap.hosts.keys().cloned());
        }
        for g in std::mem::take(&mut d.groups) {
            let group = self.snap.groups.get(&g).cloned();
            let new_profile = group.as_ref().and_then(|x| x.spec.profile.clone());
            let old_profile = self.group_profiles.get(&g).cloned();
            if new_profile != old_profile {
                if let Some(p) = &old_profile {
                    if let Some(set) = self.naming.get_mut(p) {
                        set.remove(&g);
                        if set.is_empty() {
                            self.naming.remove(p);
                        }
                    }
                }
                match &new_profile {
                    Some(p) => {
                        self.naming.entry(p.clone()).or_default().insert(g.clone());
                        self.group_profiles.insert(g.clone(), p.clone());
                    }
                    None => {
                        self.group_profiles.remove(&g);
                    }
                }
                d.profiles
                    .extend(old_profile.into_iter().chain(new_profile));
            }
            // its members may change: the old ones and whoever the new spec takes in
            d.hosts
                .extend(self.members.get(&g).into_iter().flatten().cloned());
            if let (Some(group), false) = (&group, many) {
                for (h, host) in &self.snap.hosts {
                    if is_member_of(&g, group, host) {
                        d.hosts.insert(h.clone());
                    }
                }
            }
            if group.is_none() {
                if let Some(b) = self.groups.remove(&g) {
                    self.remembered
                        .insert((SetSource::Group, g.clone()), b.pair);
                }
                self.set_diags(Producer::GroupSet(g.clone()), Vec::new());
                d.sets.insert((SetSource::Group, g.clone()));
            } else {
                d.group_sets.insert(g.clone());
            }
            d.group_profiles.insert(g.clone());
            d.group_summaries.insert(g);
        }
    }

    /// Changed hosts: memberships, resolution, addresses. Their groups' sets and summaries, and
    /// the profiles whose set of running groups changed, are redone next.
    fn host_phase(&mut self, d: &mut Dirty) {
        for h in std::mem::take(&mut d.hosts) {
            let old = self.hosts.remove(&h);
            let new = self.snap.hosts.get(&h).map(|host| {
                let groups = self.index.groups_of(host, &self.snap.groups);
                hosts::derive(
                    &h,
                    host,
                    self.snap.facts.get(&h),
                    groups,
                    &self.snap.groups,
                    &self.opts.trust_reported_addresses,
                )
            });
            d.outcomes.insert(h.clone());
            if old == new {
                if let Some(b) = new {
                    self.hosts.insert(h, b);
                }
                continue;
            }
            let no_groups = Vec::new();
            let old_groups = old.as_ref().map_or(&no_groups, |b| &b.groups);
            let new_groups = new.as_ref().map_or(&no_groups, |b| &b.groups);
            for g in old_groups {
                if !new_groups.contains(g) {
                    if let Some(m) = self.members.get_mut(g) {
                        m.remove(&h);
                        if m.is_empty() {
                            self.members.remove(g);
                        }
                    }
                }
            }
            for g in new_groups {
                self.members.entry(g.clone()).or_default().insert(h.clone());
            }
            // a change of membership, of addresses or of retirement changes the groups' sets
            d.group_sets
                .extend(old_groups.iter().chain(new_groups).cloned());
            d.group_summaries
                .extend(old_groups.iter().chain(new_groups).cloned());
            let runs = |b: &Option<HostBuild>| match b.as_ref().map(|b| &b.resolution) {
                Some(Resolution::Runs { group, .. }) => Some(group.clone()),
                _ => None,
            };
            let (was, now) = (runs(&old), runs(&new));
            if was != now {
                if let Some(g) = was {
                    let emptied = self.running.get_mut(&g).is_some_and(|r| {
                        r.remove(&h);
                        r.is_empty()
                    });
                    if emptied {
                        self.running.remove(&g);
                    }
                    self.running_changed(&g, emptied, d);
                }
                if let Some(g) = now {
                    let set = self.running.entry(g.clone()).or_default();
                    set.insert(h.clone());
                    let first = set.len() == 1;
                    self.running_changed(&g, first, d);
                }
            }
            let diags = new.as_ref().map(|b| b.diags.clone()).unwrap_or_default();
            self.set_diags(Producer::Host(h.clone()), diags);
            if let Some(b) = new {
                self.hosts.insert(h, b);
            }
        }
    }

    /// Group `g` gained or lost a running host; `flipped` when it went from none to some or
    /// back, which changes for which groups its profile is rendered.
    fn running_changed(&self, g: &str, flipped: bool, d: &mut Dirty) {
        d.group_summaries.insert(g.to_string());
        if let Some(p) = self.group_profiles.get(g) {
            d.profile_summaries.insert(p.clone());
            if flipped {
                d.profiles.insert(p.clone());
            }
        }
    }

    /// Group sets: members' addresses plus extra addresses.
    fn group_set_phase(&mut self, d: &mut Dirty) {
        for g in std::mem::take(&mut d.group_sets) {
            let Some(group) = self.snap.groups.get(&g) else {
                continue;
            };
            let b = groups::build(&g, group, self.members.get(&g), &self.hosts);
            let changed = self
                .groups
                .get(&g)
                .is_none_or(|old| !old.pair.same_content(&b.pair));
            let b = match self.groups.get(&g) {
                // keep the allocations when nothing changed
                Some(old) if !changed => GroupBuild {
                    pair: old.pair.clone(),
                    diags: b.diags,
                },
                _ => b,
            };
            self.set_diags(Producer::GroupSet(g.clone()), b.diags.clone());
            self.groups.insert(g.clone(), b);
            if changed {
                d.sets.insert((SetSource::Group, g.clone()));
            }
            d.group_summaries.insert(g);
        }
    }

    /// Groups naming a profile that does not exist.
    fn group_profile_phase(&mut self, d: &mut Dirty) {
        for g in std::mem::take(&mut d.group_profiles) {
            let diags = match self
                .snap
                .groups
                .get(&g)
                .and_then(|x| x.spec.profile.as_ref())
            {
                Some(p) if !self.snap.profiles.contains_key(p) => vec![Diagnostic {
                    kind: ObjectKind::Group,
                    name: g.clone(),
                    field: "spec.profile".into(),
                    reason: Reason::DanglingReference,
                    message: format!("profile `{p}` does not exist"),
                    severity: Severity::Error,
                }],
                _ => Vec::new(),
            };
            self.set_diags(Producer::GroupProfile(g), diags);
        }
    }

    /// Whether a rule may name Group/Zone `name`, as of now.
    fn ref_check(&self, src: SetSource, name: &str) -> Result<(), RefProblem> {
        let key = (src, name.to_string());
        let exists = match src {
            SetSource::Group => self.snap.groups.contains_key(name),
            SetSource::Zone => self.snap.zones.contains_key(name),
        };
        if !exists {
            return Err(RefProblem::Missing {
                remembered: self.remembered.contains_key(&key),
            });
        }
        if self.set_names.colliding.contains(&key) {
            return Err(RefProblem::Refused {
                reason: Reason::SetNameCollision,
                message: format!(
                    "the ipset name of {src:?} `{name}` collides with another object's"
                ),
            });
        }
        Ok(())
    }

    /// Profiles: rendered for their groups when they, the groups running them or the Groups
    /// and Zones their rules name changed.
    fn profile_phase(&mut self, d: &mut Dirty) {
        for key in std::mem::take(&mut d.refs) {
            d.profiles
                .extend(self.referrers.get(&key).into_iter().flatten().cloned());
            if key.0 == SetSource::Group {
                // a rule's `Self` peer is the group's own set
                d.profiles.extend(self.group_profiles.get(&key.1).cloned());
            }
        }
        for p in std::mem::take(&mut d.profiles) {
            let old = self.profiles.remove(&p);
            if let Some(o) = &old {
                d.firewalls.extend(o.rendered.keys().cloned());
                for r in &o.refs {
                    if let Some(set) = self.referrers.get_mut(r) {
                        set.remove(&p);
                        if set.is_empty() {
                            self.referrers.remove(r);
                        }
                    }
                }
            }
            d.profile_summaries.insert(p.clone());
            let Some(profile) = self.snap.profiles.get(&p).cloned() else {
                self.set_diags(Producer::Profile(p), Vec::new());
                continue;
            };
            let groups: Vec<String> = self.naming.get(&p).into_iter().flatten().cloned().collect();
            let running = |g: &str| self.running.contains_key(g);
            let check = |src: SetSource, n: &str| self.ref_check(src, n);
            let b = profiles::build(&p, &profile, &groups, &running, &self.opts.failsafe, &check);
            d.firewalls.extend(b.rendered.keys().cloned());
            for r in &b.refs {
                self.referrers
                    .entry(r.clone())
                    .or_default()
                    .insert(p.clone());
            }
            self.set_diags(Producer::Profile(p.clone()), b.diags.clone());
            self.profiles.insert(p, b);
        }
    }

    /// Firewalls of groups whose rendering or referenced sets changed; returns the set names
    /// whose content changed.
    fn firewall_phase(&mut self, d: &mut Dirty) -> BTreeSet<String> {
        for s in std::mem::take(&mut d.sets) {
            d.firewalls
                .extend(self.firewalls.users.get(&s).into_iter().flatten().cloned());
        }
        let mut touched = BTreeSet::new();
        for g in std::mem::take(&mut d.firewalls) {
            let profile = self.group_profiles.get(&g).cloned();
            let rendered = profile
                .as_ref()
                .and_then(|p| self.profiles.get(p))
                .and_then(|b| b.rendered.get(&g));
            let entry = match (profile.as_deref(), rendered) {
                (Some(p), Some(r)) => {
                    let previous = self.firewalls.by_group.get(&g).cloned();
                    let (groups, zones, remembered) = (&self.groups, &self.zones, &self.remembered);
                    // the current sets of a Group or Zone (its last ones when it is gone but
                    // remembered)
                    let pair_of = |src: SetSource, n: &str| {
                        match src {
                            SetSource::Group => groups.get(n).map(|b| b.pair.clone()),
                            SetSource::Zone => zones.get(n).map(|b| b.pair.clone()),
                        }
                        .or_else(|| remembered.get(&(src, n.to_string())).cloned())
                    };
                    Some(
                        self.firewalls
                            .make(&g, p, r, &self.failsafe, previous.as_ref(), &pair_of),
                    )
                }
                _ => None,
            };
            if self
                .firewalls
                .install(&g, entry, &mut self.out, &mut touched)
            {
                d.outcomes
                    .extend(self.running.get(&g).into_iter().flatten().cloned());
            }
        }
        self.firewalls.settle(&touched, &mut self.out)
    }

    /// Each touched host's outcome; returns the hosts whose outcome changed.
    fn outcome_phase(&mut self, d: &Dirty) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for h in &d.outcomes {
            // a host that keeps its group and profile only has its firewall swapped in place
            if let (
                Some(HostBuild {
                    resolution: Resolution::Runs { group, profile },
                    ..
                }),
                Some(HostOutcome::Firewall {
                    group: g,
                    profile: p,
                    firewall,
                }),
            ) = (self.hosts.get(h), self.out.hosts.get_mut(h))
            {
                let same = g == group && p == profile;
                if let Some(e) = self.firewalls.by_group.get(group).filter(|_| same) {
                    // a new firewall allocation is made only for new hashes
                    if !Arc::ptr_eq(firewall, &e.fw) {
                        changed.insert(h.clone());
                        *firewall = e.fw.clone();
                    }
                    continue;
                }
            }
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
                Some(o) => self.out.hosts.insert(h.clone(), o),
                None => self.out.hosts.remove(h),
            };
            let same = match (&old, self.out.hosts.get(h)) {
                (Some(a), Some(b)) => same_outcome(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                changed.insert(h.clone());
            }
        }
        changed
    }

    /// Remembered sets are forgotten once their Group or Zone exists again, or no rule names
    /// it any more.
    fn forget_phase(&mut self) {
        let (groups, zones) = (&self.snap.groups, &self.snap.zones);
        let referrers = &self.referrers;
        self.remembered.retain(|key, _| {
            let exists = match key.0 {
                SetSource::Group => groups.contains_key(&key.1),
                SetSource::Zone => zones.contains_key(&key.1),
            };
            !exists && referrers.contains_key(key)
        });
    }

    /// Group and profile figures for status.
    fn summary_phase(&mut self, d: &Dirty) {
        let mut profiles = d.profile_summaries.clone();
        for g in &d.group_summaries {
            let Some(group) = self.snap.groups.get(g) else {
                self.out.groups.remove(g);
                continue;
            };
            let pair = self.groups.get(g).map(|b| &b.pair);
            let list = |m: &BTreeMap<String, BTreeSet<String>>| -> Vec<String> {
                m.get(g).into_iter().flatten().cloned().collect()
            };
            self.out.groups.insert(
                g.clone(),
                GroupSummary {
                    members: list(&self.members),
                    hosts_running: list(&self.running),
                    ipv4_addresses: pair.map_or(0, |p| p.v4.members.len() as u64),
                    ipv6_addresses: pair.map_or(0, |p| p.v6.members.len() as u64),
                    profile: group.spec.profile.clone(),
                },
            );
            profiles.extend(group.spec.profile.clone());
        }
        for p in profiles {
            let Some(profile) = self.snap.profiles.get(&p) else {
                self.out.profiles.remove(&p);
                continue;
            };
            let groups: Vec<String> = self.naming.get(&p).into_iter().flatten().cloned().collect();
            let hosts = groups
                .iter()
                .flat_map(|g| self.running.get(g).into_iter().flatten().cloned())
                .collect();
            let spec = &profile.spec;
            self.out.profiles.insert(
                p.clone(),
                ProfileSummary {
                    inbound_rules: spec.inbound.iter().filter(|r| r.enabled).count() as u64,
                    outbound_rules: spec.outbound.iter().filter(|r| r.enabled).count() as u64,
                    groups,
                    hosts,
                    valid: self.profiles.get(&p).is_none_or(|b| b.valid),
                },
            );
        }
    }

    fn stale_diagnostics(&self) -> Vec<Diagnostic> {
        self.snap
            .stale
            .iter()
            .map(|((kind, name), message)| Diagnostic {
                kind: *kind,
                name: name.clone(),
                field: "metadata".into(),
                reason: Reason::LoadFailed,
                message: message.clone(),
                severity: Severity::Error,
            })
            .collect()
    }

    /// Replaces what `producer` reported.
    fn set_diags(&mut self, producer: Producer, diags: Vec<Diagnostic>) {
        let old = if diags.is_empty() {
            self.produced.remove(&producer)
        } else {
            self.produced.insert(producer, diags.clone())
        };
        if let Some(old) = old {
            self.out.diagnostics.remove(&old);
        }
        self.out.diagnostics.add(&diags);
    }
}

fn put<T>(map: &mut BTreeMap<String, T>, name: &str, value: Option<T>) {
    match value {
        Some(v) => {
            map.insert(name.to_string(), v);
        }
        None => {
            map.remove(name);
        }
    }
}

fn same_outcome(a: &HostOutcome, b: &HostOutcome) -> bool {
    match (a, b) {
        (
            HostOutcome::Firewall {
                group: g1,
                profile: p1,
                firewall: f1,
            },
            HostOutcome::Firewall {
                group: g2,
                profile: p2,
                firewall: f2,
            },
        ) => g1 == g2 && p1 == p2 && (Arc::ptr_eq(f1, f2) || f1.hashes == f2.hashes),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn two_member_changes_fold_into_one() {
        let (a, b, c) = (net("10.0.0.1/32"), net("10.0.0.2/32"), net("10.0.0.3/32"));
        // {a, b} -> {b, c} -> {a, b, c}... then back
        let first = SetDiff {
            base_hash: "h0".into(),
            hash: "h1".into(),
            add: vec![c],
            remove: vec![a],
        };
        let back = SetDiff {
            base_hash: "h1".into(),
            hash: "h2".into(),
            add: vec![a],
            remove: vec![c],
        };
        let both = first.clone().then(&back).unwrap();
        assert_eq!((both.add, both.remove), (vec![], vec![]));
        assert_eq!((both.base_hash.as_str(), both.hash.as_str()), ("h0", "h2"));
        let more = SetDiff {
            base_hash: "h1".into(),
            hash: "h3".into(),
            add: vec![a],
            remove: vec![b],
        };
        let both = first.clone().then(&more).unwrap();
        assert_eq!((both.add, both.remove), (vec![c], vec![b]));
        // a change that does not start where the first ended cannot be folded
        assert!(first.then(&SetDiff::default()).is_none());
    }
}
