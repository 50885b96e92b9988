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
    same_sets, CompileOptions, Compiled, Diagnostic, GroupSummary, HostFacts, HostOutcome,
    ObjectKind, ProfileSummary, Reason, SetPair, Severity, Snapshot,
};
use crate::crd::{ConfigMapAddressSource, Group, Host, Profile, Zone};
use dog_protocol::ruleset::Family;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// More changed groups than this in one call recompute every host's memberships through the
/// index instead of checking each changed group against every host.
const MANY_GROUPS: usize = 8;

mod changes;
mod edits;
mod outcomes;
mod phases;

pub use changes::{Changes, SetDiff};

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
    /// Groups whose firewall is another one now: their running hosts' firewalls are swapped.
    swaps: BTreeSet<String>,
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
