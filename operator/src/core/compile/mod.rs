//! The compiler: a pure function from a snapshot of dog's resources to, per host, the IPv4 and
//! IPv6 rule documents for dog's own chains plus the ipsets they reference (docs/design.md, Compilation).
//!
//! No Kubernetes, broker or kernel access happens here. Bad input never panics and never
//! widens access: it becomes a [`Diagnostic`] naming the object and field, and only the
//! affected output is withheld.

pub mod addresses;
mod compiler;
mod firewalls;
mod groups;
mod hosts;
pub mod ports;
mod profiles;
pub mod render;
pub mod resolve;
pub mod setname;
pub mod validate;
mod zones;

pub use compiler::{config_map_key, Changes, Compiler, Edit, SetDiff};

use crate::crd::{Group, Host, HostState, InterfaceStatus, Profile, Zone};
use dog_protocol::messages::{EncodeError, EncodedFirewall, EncodedSet};
use dog_protocol::ruleset::{
    Failsafe, Family, FirewallHashes, HostFirewall, IpSet, PerFamily, RulesDocument,
};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Everything the compiler reads. Objects are keyed by name (all kinds are cluster-scoped) and
/// shared (`Arc`), so taking a snapshot and comparing it with the last one is cheap.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub zones: BTreeMap<String, Arc<Zone>>,
    pub hosts: BTreeMap<String, Arc<Host>>,
    pub groups: BTreeMap<String, Arc<Group>>,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    /// Address lines of ConfigMaps referenced by Zones, keyed by `namespace/name/key`.
    pub config_map_addresses: BTreeMap<String, Arc<Vec<String>>>,
    /// What the operator knows of each host beyond its resource: the interfaces its agent
    /// reported and its lifecycle state. Not read from `Host.status`: the operator's fleet view
    /// is the authority, and status is only its record.
    pub facts: BTreeMap<String, HostFacts>,
    /// The names of the Kubernetes Nodes that exist (cluster mode; `None` elsewhere). A Host
    /// whose `spec.nodeName` is not among them is retired, whatever its agent says.
    pub nodes: Option<BTreeSet<String>>,
    /// Objects used in their last good version because their source no longer loads
    /// (`--from-dir`: the file has an error), with that error. Status reports it.
    pub stale: BTreeMap<(ObjectKind, String), String>,
}

impl Snapshot {
    /// Takes each Host's facts from what its status records (its last reported interfaces and
    /// state), for hosts without facts: what a preview of a directory, or a restarted
    /// operator, knows before any agent speaks.
    pub fn facts_from_status(&mut self) {
        for (name, host) in &self.hosts {
            if let Some(st) = &host.status {
                self.facts.entry(name.clone()).or_insert_with(|| HostFacts {
                    state: st.state,
                    interfaces: st.interfaces.clone(),
                });
            }
        }
    }
}

/// What the operator knows of a host at run time: the interfaces its agent reported (used only
/// within trusted ranges) and its lifecycle state (a retired host's addresses leave its groups).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub state: HostState,
    pub interfaces: Vec<InterfaceStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    pub failsafe: Failsafe,
    /// Ranges within which every host's reported addresses are believed
    /// (`--trust-reported-addresses`); empty: only what a Host or its Groups allow.
    pub trust_reported_addresses: Vec<ipnet::IpNet>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ObjectKind {
    Zone,
    Host,
    Group,
    Profile,
}

/// How much a [`Diagnostic`] costs the object it is about.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Severity {
    /// Refused: a Profile with an error is withheld (its hosts keep their last rules); an
    /// invalid entry is dropped. Status says `Valid: False`.
    #[default]
    Error,
    /// Applied, but not as written (a rule whose peer is missing fails closed, an entry was
    /// normalized). Status says `Degraded: True`.
    Warning,
}

/// Why the compiler refused or warns about a field: the word a condition's `reason` carries
/// (`kubectl get` shows it) and the `reason` of a diagnostic in `compile --json`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Reason {
    /// Two objects whose ipset names collide (neither can be used).
    SetNameCollision,
    /// A Group, Zone or Profile named by another object does not exist.
    DanglingReference,
    /// A Host is claimed by more than one Group.
    Conflict,
    /// An address or CIDR does not parse.
    InvalidAddress,
    /// A CIDR with host bits set, applied as its network.
    HostBitsSet,
    /// An address the agent reports that no `trustReportedAddresses` covers (not used).
    UntrustedAddress,
    /// A rule's peer combines fields its kind does not take.
    InvalidPeer,
    /// A field the rule's kind or type needs is missing.
    MissingField,
    /// A port or range does not parse, or the protocol takes no ports.
    InvalidPort,
    /// A field's value is out of range.
    InvalidField,
    /// Not a Linux interface name.
    InvalidInterface,
    /// The rule's protocol and its peer's addresses share no address family.
    NoFamily,
    /// The object's source no longer loads; its last good version is used.
    LoadFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SetNameCollision => "SetNameCollision",
            Reason::DanglingReference => "DanglingReference",
            Reason::Conflict => "Conflict",
            Reason::InvalidAddress => "InvalidAddress",
            Reason::HostBitsSet => "HostBitsSet",
            Reason::UntrustedAddress => "UntrustedAddress",
            Reason::InvalidPeer => "InvalidPeer",
            Reason::MissingField => "MissingField",
            Reason::InvalidPort => "InvalidPort",
            Reason::InvalidField => "InvalidField",
            Reason::InvalidInterface => "InvalidInterface",
            Reason::NoFamily => "NoFamily",
            Reason::LoadFailed => "LoadFailed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One thing the compiler refused or warns about, per object and field.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Diagnostic {
    pub kind: ObjectKind,
    pub name: String,
    /// JSON-path-like field, e.g. `spec.inbound[2].peer.name`.
    pub field: String,
    /// Why, as the CamelCase word a condition's `reason` carries.
    pub reason: Reason,
    pub message: String,
    #[serde(default)]
    pub severity: Severity,
}

/// Every diagnostic of a compile, sorted and without duplicates (two producers may report the
/// same one), and found per object without a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics {
    /// Each diagnostic with the number of producers reporting it.
    all: BTreeMap<Diagnostic, u32>,
}

impl Diagnostics {
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.all.keys()
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The diagnostics about one object, in order.
    pub fn of(&self, kind: ObjectKind, name: &str) -> Vec<&Diagnostic> {
        let from = Diagnostic {
            kind,
            name: name.to_string(),
            field: String::new(),
            reason: Reason::SetNameCollision,
            message: String::new(),
            severity: Severity::Error,
        };
        self.all
            .range(from..)
            .map(|(d, _)| d)
            .take_while(|d| d.kind == kind && d.name == name)
            .collect()
    }

    pub(crate) fn add(&mut self, diags: &[Diagnostic]) {
        for d in diags {
            *self.all.entry(d.clone()).or_default() += 1;
        }
    }

    pub(crate) fn remove(&mut self, diags: &[Diagnostic]) {
        for d in diags {
            if let Some(n) = self.all.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.all.remove(d);
                }
            }
        }
    }
}

impl serde::Serialize for Diagnostics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// The firewall every member host of one group runs: rendered once per (group, profile) and
/// shared between the hosts (and between compiles, when nothing it depends on changed). Sets
/// are shared with [`Compiled::sets`]; use [`CompiledFirewall::to_host_firewall`] for the
/// self-contained wire form.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledFirewall {
    pub group: String,
    pub profile: String,
    pub ipv4: Arc<RulesDocument>,
    pub ipv6: Arc<RulesDocument>,
    /// Sets referenced by either document, by name.
    pub sets: BTreeMap<String, Arc<IpSet>>,
    /// The same for every firewall of a compile (shared, not copied per group).
    pub failsafe: Arc<Failsafe>,
    /// Content hashes (computed once; set hashes are cached between compiles).
    pub hashes: FirewallHashes,
}

impl CompiledFirewall {
    pub fn hashes(&self) -> FirewallHashes {
        self.hashes.clone()
    }

    pub fn document(&self, family: Family) -> &RulesDocument {
        self.document_arc(family)
    }

    pub(crate) fn document_arc(&self, family: Family) -> &Arc<RulesDocument> {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }

    /// A compiled firewall holding `hf`'s documents and sets (tests build their firewalls from
    /// the wire form).
    #[cfg(test)]
    pub(crate) fn from_host_firewall(hf: HostFirewall) -> Self {
        CompiledFirewall {
            group: "g".into(),
            profile: "p".into(),
            hashes: hf.hashes(),
            ipv4: Arc::new(hf.ipv4),
            ipv6: Arc::new(hf.ipv6),
            sets: hf.sets.into_iter().map(|(n, s)| (n, Arc::new(s))).collect(),
            failsafe: Arc::new(hf.failsafe),
        }
    }

    /// The self-contained firewall of `host` (copies the sets).
    pub fn to_host_firewall(&self, host: &str) -> HostFirewall {
        self.to_host_firewall_without(host, &BTreeMap::<String, ()>::new())
    }

    /// The parts every host of this firewall is sent alike, serialized once
    /// ([`EncodedFirewall`]); an Apply is then put together per host without copying them.
    /// `sets` holds the sets already encoded for other firewalls, by the address of their
    /// `Arc` (the compiler shares one set between the firewalls that use it), and gains this
    /// one's.
    pub fn encode(
        &self,
        sets: &mut HashMap<usize, Arc<EncodedSet>>,
    ) -> Result<EncodedFirewall, EncodeError> {
        // a firewall lists each set under the set's own name (firewalls.rs), so one set's
        // encoding, checked under that name, serves every firewall that uses it
        let mut mine = BTreeMap::new();
        for (name, set) in &self.sets {
            let encoded = match sets.entry(Arc::as_ptr(set) as usize) {
                Entry::Occupied(e) => Arc::clone(e.get()),
                Entry::Vacant(v) => Arc::clone(v.insert(Arc::new(EncodedSet::new(name, set)?))),
            };
            mine.insert(name.clone(), encoded);
        }
        EncodedFirewall::new(&self.ipv4, &self.ipv6, mine, &self.failsafe)
    }

    /// The firewall of `host` without the sets named in `kept` (which the host holds).
    pub fn to_host_firewall_without<V>(
        &self,
        host: &str,
        kept: &BTreeMap<String, V>,
    ) -> HostFirewall {
        HostFirewall {
            host: host.to_string(),
            ipv4: (*self.ipv4).clone(),
            ipv6: (*self.ipv6).clone(),
            sets: self
                .sets
                .iter()
                .filter(|(n, _)| !kept.contains_key(*n))
                .map(|(n, s)| (n.clone(), (**s).clone()))
                .collect(),
            failsafe: (*self.failsafe).clone(),
        }
    }
}

/// What the compiler decided for one host.
#[derive(Clone, Debug, PartialEq)]
pub enum HostOutcome {
    /// The host runs this firewall.
    Firewall {
        group: String,
        profile: String,
        firewall: Arc<CompiledFirewall>,
    },
    /// Labels match several groups with different profiles: keep the last applied rules.
    Conflict { groups: Vec<String> },
    /// The host is in no group (or its group has no profile): nothing to send.
    Unmanaged,
    /// The host's profile could not be compiled: keep the last applied rules (see diagnostics).
    Withheld { group: String, profile: String },
}

/// The compiler's whole output for a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub hosts: BTreeMap<String, HostOutcome>,
    /// Every set referenced by any host, by set name (shared between hosts).
    pub sets: BTreeMap<String, Arc<IpSet>>,
    pub diagnostics: Diagnostics,
    /// Content hash of every set in `sets`.
    pub set_hashes: BTreeMap<String, String>,
    /// Per-object figures for status.
    pub zones: BTreeMap<String, ZoneSummary>,
    pub groups: BTreeMap<String, GroupSummary>,
    pub profiles: BTreeMap<String, ProfileSummary>,
}

impl Compiled {
    /// Diagnostics about one object.
    pub fn diagnostics_for(&self, kind: ObjectKind, name: &str) -> Vec<&Diagnostic> {
        self.diagnostics.of(kind, name)
    }

    /// The self-contained firewall of `host`, when it runs one.
    pub fn host_firewall(&self, host: &str) -> Option<HostFirewall> {
        match self.hosts.get(host) {
            Some(HostOutcome::Firewall { firewall, .. }) => Some(firewall.to_host_firewall(host)),
            _ => None,
        }
    }
}

/// Zone figures for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ZoneSummary {
    /// Distinct canonical entries per family.
    pub ipv4_count: u64,
    pub ipv6_count: u64,
    pub invalid_count: u64,
    /// The first invalid entries (at most 20), each with where it came from and why.
    pub invalid_entries: Vec<String>,
}

/// Group figures for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupSummary {
    /// Member hosts (by names list, selector or pin), sorted.
    pub members: Vec<String>,
    /// Hosts that run this group's profile as their group (desired hosts).
    pub hosts_running: Vec<String>,
    pub ipv4_addresses: u64,
    pub ipv6_addresses: u64,
    pub profile: Option<String>,
}

/// Profile figures for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProfileSummary {
    /// Enabled rules.
    pub inbound_rules: u64,
    pub outbound_rules: u64,
    /// Groups naming this profile.
    pub groups: Vec<String>,
    /// Hosts that should run it.
    pub hosts: Vec<String>,
    /// False when the profile has errors (its hosts are withheld).
    pub valid: bool,
}

/// The pure entry point: compiles a whole snapshot.
pub fn compile(snapshot: &Snapshot, opts: &CompileOptions) -> Compiled {
    let mut c = Compiler::new(opts.clone());
    c.load(snapshot.clone());
    c.into_compiled()
}

/// Both families' sets of one Group or Zone.
pub(crate) type SetPair = PerFamily<Arc<IpSet>>;

/// The same members in both families.
pub(crate) fn same_sets(a: &SetPair, b: &SetPair) -> bool {
    a.iter()
        .zip(b.iter())
        .all(|((_, x), (_, y))| Arc::ptr_eq(x, y) || x == y)
}
