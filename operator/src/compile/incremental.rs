//! The stateful compiler: holds the last snapshot and everything derived from it, so that the
//! frequent small changes are cheap. A changed Zone (or a ConfigMap a Zone reads) only
//! recomputes that Zone's two sets and swaps them into the firewalls that use them — no rule is
//! re-rendered. Every other change recompiles the snapshot (rendering is per group, not per
//! host, so this stays well under a second for thousands of hosts) and reports what changed.
//! [`super::compile`] is this compiler run once; tests assert both give equal results.

use super::addresses::{parse_entry, parse_host_address};
use super::render::{render_profile, RenderedProfile};
use super::resolve::{resolve, GroupIndex, Resolution};
use super::setname::{set_name, SetSource};
use super::validate::RefProblem;
use super::{
    CompileOptions, Compiled, CompiledFirewall, Diagnostic, GroupSummary, HostOutcome, ObjectKind,
    ProfileSummary, Reason, Severity, Snapshot, ZoneSummary,
};
use crate::crd::{Group, Host, HostState, Profile, Zone};
use dog_protocol::ruleset::{sets_hash, Family, FirewallHashes, IpSet};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// How many invalid entries of one zone are reported individually.
const INVALID_LISTED: usize = 20;

/// What a call changed: hosts whose outcome or firewall hashes changed, and sets whose content
/// changed (or that appeared or disappeared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub hosts: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    /// Whether the whole snapshot was recompiled (false: only sets were recomputed).
    pub full: bool,
}

#[derive(Clone, Debug)]
struct SetPair {
    v4: Arc<IpSet>,
    v6: Arc<IpSet>,
}

impl SetPair {
    fn get(&self, f: Family) -> &Arc<IpSet> {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// A group's firewall, the hosts running it and the Groups/Zones whose sets it references.
type FirewallEntry = (
    Arc<CompiledFirewall>,
    Vec<String>,
    BTreeSet<(SetSource, String)>,
);

/// Incremental compiler; see the module docs.
#[derive(Debug, Default)]
pub struct Compiler {
    opts: CompileOptions,
    snap: Snapshot,
    zone_sets: BTreeMap<String, SetPair>,
    zone_diags: BTreeMap<String, Vec<Diagnostic>>,
    group_sets: BTreeMap<String, SetPair>,
    /// The last sets of Groups and Zones that no longer exist but that a DROP/REJECT rule
    /// still names: such a rule keeps blocking these members (fail closed).
    remembered: BTreeMap<(SetSource, String), SetPair>,
    other_diags: Vec<Diagnostic>,
    /// Set name → (set, hash) of the last compile, to avoid re-hashing unchanged sets.
    hash_cache: HashMap<String, (Arc<IpSet>, String)>,
    /// (source kind, name) → groups whose firewall references its sets.
    users: BTreeMap<(SetSource, String), BTreeSet<String>>,
    /// Group → the firewall its hosts run, and those hosts.
    firewalls: BTreeMap<String, FirewallEntry>,
    out: Compiled,
}

impl Compiler {
    pub fn new(opts: CompileOptions) -> Self {
        Compiler {
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

    /// Replaces the whole snapshot and recompiles.
    pub fn load(&mut self, snapshot: Snapshot) -> Changes {
        self.snap = snapshot;
        self.rebuild()
    }

    /// Moves to `snapshot`, taking the fast path when only existing Zones' contents and/or
    /// ConfigMap address lines changed (their sets are recomputed, no rule is re-rendered);
    /// any other difference recompiles everything. This is what a running operator calls on
    /// every change of its source.
    pub fn update(&mut self, snapshot: Snapshot) -> Changes {
        // compares what the compiler reads of each object
        fn same<V>(
            a: &BTreeMap<String, V>,
            b: &BTreeMap<String, V>,
            eq: impl Fn(&V, &V) -> bool,
        ) -> bool {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && eq(va, vb))
        }
        let host_eq = |a: &Host, b: &Host| {
            let (sa, sb) = (a.status.as_ref(), b.status.as_ref());
            a.metadata.labels == b.metadata.labels
                && a.spec == b.spec
                && sa.map(|s| s.state) == sb.map(|s| s.state)
                && sa.map(|s| &s.interfaces) == sb.map(|s| &s.interfaces)
        };
        let same_shape = same(&snapshot.hosts, &self.snap.hosts, host_eq)
            && same(&snapshot.groups, &self.snap.groups, |a, b| a.spec == b.spec)
            && same(&snapshot.profiles, &self.snap.profiles, |a, b| {
                a.spec == b.spec
            })
            && snapshot.zones.keys().eq(self.snap.zones.keys())
            && snapshot.stale == self.snap.stale;
        if !same_shape || self.out.hosts.is_empty() && !snapshot.hosts.is_empty() {
            return self.load(snapshot);
        }
        let mut changes = Changes::default();
        let mut merge = |c: Changes| {
            changes.hosts.extend(c.hosts);
            changes.sets.extend(c.sets);
            changes.full |= c.full;
        };
        let mut keys: BTreeSet<&String> = snapshot.config_map_addresses.keys().collect();
        keys.extend(self.snap.config_map_addresses.keys());
        let changed_maps: Vec<(String, Option<Arc<Vec<String>>>)> = keys
            .into_iter()
            .filter(|k| {
                match (
                    snapshot.config_map_addresses.get(*k),
                    self.snap.config_map_addresses.get(*k),
                ) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                    (None, None) => false,
                    _ => true,
                }
            })
            .map(|k| (k.clone(), snapshot.config_map_addresses.get(k).cloned()))
            .collect();
        for (key, lines) in changed_maps {
            merge(self.set_config_map(&key, lines));
        }
        let changed_zones: Vec<Zone> = snapshot
            .zones
            .iter()
            .filter(|(n, z)| self.snap.zones.get(*n).map(|o| &o.spec) != Some(&z.spec))
            .map(|(_, z)| z.clone())
            .collect();
        for zone in changed_zones {
            merge(self.upsert_zone(zone));
        }
        changes
    }

    /// Adds or replaces a Zone. A zone that already existed only has its sets recomputed.
    pub fn upsert_zone(&mut self, zone: Zone) -> Changes {
        let name = zone.metadata.name.clone().unwrap_or_default();
        let existed = self.snap.zones.insert(name.clone(), zone).is_some();
        if existed {
            self.refresh_zones(&[name])
        } else {
            self.rebuild()
        }
    }

    pub fn delete_zone(&mut self, name: &str) -> Changes {
        if self.snap.zones.remove(name).is_some() {
            self.rebuild()
        } else {
            Changes::default()
        }
    }

    /// Sets the address lines of a ConfigMap key (`namespace/name/key`); `None` removes it.
    /// Only the zones reading it are recomputed.
    pub fn set_config_map(&mut self, key: &str, lines: Option<Arc<Vec<String>>>) -> Changes {
        match lines {
            Some(l) => {
                self.snap.config_map_addresses.insert(key.to_string(), l);
            }
            None => {
                self.snap.config_map_addresses.remove(key);
            }
        }
        let readers: Vec<String> = self
            .snap
            .zones
            .iter()
            .filter(|(_, z)| {
                z.spec
                    .config_map_refs
                    .iter()
                    .any(|r| config_map_key(r) == key)
            })
            .map(|(n, _)| n.clone())
            .collect();
        self.refresh_zones(&readers)
    }

    pub fn upsert_host(&mut self, host: Host) -> Changes {
        let name = host.metadata.name.clone().unwrap_or_default();
        self.snap.hosts.insert(name, host);
        self.rebuild()
    }

    pub fn delete_host(&mut self, name: &str) -> Changes {
        self.snap.hosts.remove(name);
        self.rebuild()
    }

    pub fn upsert_group(&mut self, group: Group) -> Changes {
        let name = group.metadata.name.clone().unwrap_or_default();
        self.snap.groups.insert(name, group);
        self.rebuild()
    }

    pub fn delete_group(&mut self, name: &str) -> Changes {
        self.snap.groups.remove(name);
        self.rebuild()
    }

    pub fn upsert_profile(&mut self, profile: Profile) -> Changes {
        let name = profile.metadata.name.clone().unwrap_or_default();
        self.snap.profiles.insert(name, profile);
        self.rebuild()
    }

    pub fn delete_profile(&mut self, name: &str) -> Changes {
        self.snap.profiles.remove(name);
        self.rebuild()
    }

    // --------------------------------------------------------------------------------------

    fn hash_of(&mut self, set: &Arc<IpSet>) -> (Arc<IpSet>, String) {
        if let Some((old, h)) = self.hash_cache.get(&set.name) {
            if Arc::ptr_eq(old, set) || **old == **set {
                return (old.clone(), h.clone());
            }
        }
        let h = set.hash();
        self.hash_cache
            .insert(set.name.clone(), (set.clone(), h.clone()));
        (set.clone(), h)
    }

    fn make_firewall(
        &mut self,
        group: &str,
        profile: &str,
        ipv4: Arc<dog_protocol::ruleset::RulesDocument>,
        ipv6: Arc<dog_protocol::ruleset::RulesDocument>,
        sources: &BTreeSet<(SetSource, String)>,
    ) -> CompiledFirewall {
        let mut sets = BTreeMap::new();
        let mut hashes = Vec::new();
        for (src, name) in sources {
            let pair = match src {
                SetSource::Group => self.group_sets.get(name),
                SetSource::Zone => self.zone_sets.get(name),
            }
            .or_else(|| self.remembered.get(&(*src, name.clone())))
            .cloned();
            for f in Family::BOTH {
                let set = match &pair {
                    Some(p) => p.get(f).clone(),
                    None => Arc::new(IpSet::new(set_name(*src, name, f), f, [])),
                };
                let (set, h) = self.hash_of(&set);
                hashes.push((set.name.clone(), h));
                sets.insert(set.name.clone(), set);
            }
        }
        let hashes = FirewallHashes {
            ipv4_rules: ipv4.hash(),
            ipv6_rules: ipv6.hash(),
            sets: sets_hash(hashes.iter().map(|(n, h)| (n.as_str(), h.as_str()))),
        };
        CompiledFirewall {
            group: group.to_string(),
            profile: profile.to_string(),
            ipv4,
            ipv6,
            sets,
            failsafe: self.opts.failsafe.clone(),
            hashes,
        }
    }

    fn merge_diagnostics(&mut self) {
        let mut all: BTreeSet<Diagnostic> = self.other_diags.iter().cloned().collect();
        for d in self.zone_diags.values() {
            all.extend(d.iter().cloned());
        }
        self.out.diagnostics = all.into_iter().collect();
    }

    /// Recomputes the sets of `zones` (which exist) and swaps them into the firewalls using
    /// them. No rule is rendered.
    fn refresh_zones(&mut self, zones: &[String]) -> Changes {
        let mut changes = Changes::default();
        for name in zones {
            let Some(zone) = self.snap.zones.get(name) else {
                continue;
            };
            let (pair, summary, diags) = build_zone(name, zone, &self.snap.config_map_addresses);
            self.out.zones.insert(name.clone(), summary);
            self.zone_diags.insert(name.clone(), diags);
            let same = self
                .zone_sets
                .get(name)
                .is_some_and(|old| *old.v4 == *pair.v4 && *old.v6 == *pair.v6);
            self.zone_sets.insert(name.clone(), pair.clone());
            if same {
                continue;
            }
            let users = self
                .users
                .get(&(SetSource::Zone, name.clone()))
                .cloned()
                .unwrap_or_default();
            if users.is_empty() {
                continue;
            }
            for f in Family::BOTH {
                let set = pair.get(f).clone();
                let (set, h) = self.hash_of(&set);
                changes.sets.insert(set.name.clone());
                self.out.set_hashes.insert(set.name.clone(), h);
                self.out.sets.insert(set.name.clone(), set);
            }
            for group in users {
                let Some((old, hosts, sources)) = self.firewalls.get(&group).cloned() else {
                    continue;
                };
                let fw = Arc::new(self.make_firewall(
                    &old.group,
                    &old.profile,
                    old.ipv4.clone(),
                    old.ipv6.clone(),
                    &sources,
                ));
                for h in &hosts {
                    self.out.hosts.insert(
                        h.clone(),
                        HostOutcome::Firewall {
                            group: fw.group.clone(),
                            profile: fw.profile.clone(),
                            firewall: fw.clone(),
                        },
                    );
                    changes.hosts.insert(h.clone());
                }
                self.firewalls.insert(group, (fw, hosts, sources));
            }
        }
        self.merge_diagnostics();
        changes
    }

    /// Recompiles everything from the snapshot and reports what changed.
    fn rebuild(&mut self) -> Changes {
        let old = std::mem::take(&mut self.out);
        let snap = std::mem::take(&mut self.snap);
        let mut diags: Vec<Diagnostic> = Vec::new();
        let mut out = Compiled::default();

        // ---- what existed until now, for rules whose peer is gone
        for (n, p) in std::mem::take(&mut self.zone_sets) {
            self.remembered.insert((SetSource::Zone, n), p);
        }
        for (n, p) in std::mem::take(&mut self.group_sets) {
            self.remembered.insert((SetSource::Group, n), p);
        }

        // ---- zones
        self.zone_diags.clear();
        for (name, zone) in &snap.zones {
            let (pair, summary, zd) = build_zone(name, zone, &snap.config_map_addresses);
            self.zone_sets.insert(name.clone(), pair);
            self.zone_diags.insert(name.clone(), zd);
            out.zones.insert(name.clone(), summary);
        }

        // ---- set names must not collide
        let mut owners: HashMap<String, (SetSource, String)> = HashMap::new();
        let mut colliding: BTreeSet<(SetSource, String)> = BTreeSet::new();
        let all_sources = snap
            .groups
            .keys()
            .map(|n| (SetSource::Group, n.clone()))
            .chain(snap.zones.keys().map(|n| (SetSource::Zone, n.clone())));
        for (src, name) in all_sources {
            for f in Family::BOTH {
                let sn = set_name(src, &name, f);
                if let Some(prev) = owners.get(&sn) {
                    if *prev != (src, name.clone()) {
                        colliding.insert(prev.clone());
                        colliding.insert((src, name.clone()));
                    }
                } else {
                    owners.insert(sn, (src, name.clone()));
                }
            }
        }
        for (src, name) in &colliding {
            diags.push(Diagnostic {
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
            });
        }

        // ---- hosts: memberships, addresses
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut resolutions: BTreeMap<String, Resolution> = BTreeMap::new();
        let mut host_addrs: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        let index = GroupIndex::new(&snap.groups);
        for (hname, host) in &snap.hosts {
            if let Some(pin) = &host.spec.group {
                if !snap.groups.contains_key(pin) {
                    diags.push(Diagnostic {
                        kind: ObjectKind::Host,
                        name: hname.clone(),
                        field: "spec.group".into(),
                        reason: Reason::DanglingReference,
                        message: format!("pinned group `{pin}` does not exist"),
                        severity: Severity::Error,
                    });
                }
            }
            let mine = index.groups_of(host);
            for g in &mine {
                members.entry(g.clone()).or_default().push(hname.clone());
            }
            let r = resolve(&mine, &snap.groups);
            if let Resolution::Conflict { groups } = &r {
                diags.push(Diagnostic {
                    kind: ObjectKind::Host,
                    name: hname.clone(),
                    field: "metadata.labels".into(),
                    reason: Reason::Conflict,
                    message: format!(
                        "member of groups with different profiles: {}",
                        groups
                            .iter()
                            .map(|g| format!(
                                "{g} ({})",
                                snap.groups
                                    .get(g)
                                    .and_then(|x| x.spec.profile.clone())
                                    .unwrap_or_default()
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    severity: Severity::Error,
                });
            }
            resolutions.insert(hname.clone(), r);
            let own = trusted_ranges(hname, host, &mine, &snap.groups, &mut diags);
            let trusted = Trusted {
                operator: &self.opts.trust_reported_addresses,
                own: &own,
            };
            host_addrs.insert(
                hname.clone(),
                host_addresses(hname, host, trusted, &mut diags),
            );
        }

        // ---- group sets
        self.group_sets.clear();
        for (gname, group) in &snap.groups {
            let mut nets: Vec<IpNet> = Vec::new();
            let empty = Vec::new();
            let mem = members.get(gname).unwrap_or(&empty);
            for h in mem {
                let retired = snap
                    .hosts
                    .get(h)
                    .and_then(|x| x.status.as_ref())
                    .is_some_and(|s| s.state == HostState::Retired);
                if !retired {
                    nets.extend(host_addrs.get(h).into_iter().flatten().copied());
                }
            }
            for (i, a) in group.spec.trust_reported_addresses.iter().enumerate() {
                if let Err(m) = parse_entry(a) {
                    diags.push(Diagnostic {
                        kind: ObjectKind::Group,
                        name: gname.clone(),
                        field: format!("spec.trustReportedAddresses[{i}]"),
                        reason: Reason::InvalidAddress,
                        message: format!("{m}; entry ignored"),
                        severity: Severity::Error,
                    });
                }
            }
            for (i, a) in group.spec.extra_addresses.iter().enumerate() {
                match parse_entry(a) {
                    Ok(n) => {
                        if n.trunc() != n {
                            diags.push(Diagnostic {
                                kind: ObjectKind::Group,
                                name: gname.clone(),
                                field: format!("spec.extraAddresses[{i}]"),
                                reason: Reason::HostBitsSet,
                                message: format!(
                                    "`{a}` has host bits set; applied as {}",
                                    n.trunc()
                                ),
                                severity: Severity::Warning,
                            });
                        }
                        nets.push(n)
                    }
                    Err(m) => diags.push(Diagnostic {
                        kind: ObjectKind::Group,
                        name: gname.clone(),
                        field: format!("spec.extraAddresses[{i}]"),
                        reason: Reason::InvalidAddress,
                        message: m,
                        severity: Severity::Error,
                    }),
                }
            }
            let pair = make_pair(SetSource::Group, gname, nets);
            out.groups.insert(
                gname.clone(),
                GroupSummary {
                    members: mem.clone(),
                    hosts_running: Vec::new(),
                    ipv4_addresses: pair.v4.members.len() as u64,
                    ipv6_addresses: pair.v6.members.len() as u64,
                    profile: group.spec.profile.clone(),
                },
            );
            self.group_sets.insert(gname.clone(), pair);
        }

        // ---- hosts running each group
        let mut running: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (h, r) in &resolutions {
            if let Resolution::Runs { group, .. } = r {
                running.entry(group.clone()).or_default().push(h.clone());
            }
        }

        // ---- profiles, rendered once per group
        let remembered = &self.remembered;
        let refs = |src: SetSource, name: &str| -> Result<(), RefProblem> {
            let exists = match src {
                SetSource::Group => snap.groups.contains_key(name),
                SetSource::Zone => snap.zones.contains_key(name),
            };
            if !exists {
                return Err(RefProblem::Missing {
                    remembered: remembered.contains_key(&(src, name.to_string())),
                });
            }
            if colliding.contains(&(src, name.to_string())) {
                return Err(RefProblem::Refused {
                    reason: Reason::SetNameCollision,
                    message: format!(
                        "the ipset name of {src:?} `{name}` collides with another object's"
                    ),
                });
            }
            Ok(())
        };
        let mut profile_errors: BTreeMap<String, Vec<Diagnostic>> = BTreeMap::new();
        let mut rendered: BTreeMap<String, RenderedProfile> = BTreeMap::new();
        for (pname, profile) in &snap.profiles {
            let spec = &profile.spec;
            let groups: Vec<String> = snap
                .groups
                .iter()
                .filter(|(_, g)| g.spec.profile.as_deref() == Some(pname))
                .map(|(n, _)| n.clone())
                .collect();
            let hosts: Vec<String> = groups
                .iter()
                .flat_map(|g| running.get(g).cloned().unwrap_or_default())
                .collect();
            out.profiles.insert(
                pname.clone(),
                ProfileSummary {
                    inbound_rules: spec.inbound.iter().filter(|r| r.enabled).count() as u64,
                    outbound_rules: spec.outbound.iter().filter(|r| r.enabled).count() as u64,
                    groups: groups.clone(),
                    hosts,
                    valid: true,
                },
            );
            // validate even when no group runs it (a self peer resolves to a placeholder)
            let targets: Vec<String> = if groups.is_empty() {
                vec![String::new()]
            } else {
                groups
                    .iter()
                    .filter(|g| running.contains_key(*g))
                    .cloned()
                    .collect()
            };
            let targets = if targets.is_empty() {
                vec![groups[0].clone()]
            } else {
                targets
            };
            for g in targets {
                let placeholder = g.is_empty();
                let check = |src: SetSource, name: &str| {
                    if placeholder && src == SetSource::Group && name.is_empty() {
                        Ok(())
                    } else {
                        refs(src, name)
                    }
                };
                match render_profile(pname, profile, &g, &self.opts.failsafe, &check) {
                    Ok(r) => {
                        diags.extend(r.warnings.iter().cloned());
                        if !placeholder {
                            rendered.insert(g, r);
                        }
                    }
                    Err(d) => {
                        profile_errors.entry(pname.clone()).or_default().extend(d);
                        break;
                    }
                }
            }
        }
        for (pname, d) in &profile_errors {
            if let Some(s) = out.profiles.get_mut(pname) {
                s.valid = false;
            }
            diags.extend(d.iter().cloned());
        }
        for (gname, group) in &snap.groups {
            if let Some(p) = &group.spec.profile {
                if !snap.profiles.contains_key(p) {
                    diags.push(Diagnostic {
                        kind: ObjectKind::Group,
                        name: gname.clone(),
                        field: "spec.profile".into(),
                        reason: Reason::DanglingReference,
                        message: format!("profile `{p}` does not exist"),
                        severity: Severity::Error,
                    });
                }
            }
        }

        // ---- objects whose source no longer loads (their last good version is used)
        for ((kind, name), message) in &snap.stale {
            diags.push(Diagnostic {
                kind: *kind,
                name: name.clone(),
                field: "metadata".into(),
                reason: Reason::LoadFailed,
                message: message.clone(),
                severity: Severity::Error,
            });
        }

        // ---- firewalls per group, reusing unchanged documents of the previous compile
        self.snap = snap;
        let mut firewalls = BTreeMap::new();
        let mut users: BTreeMap<(SetSource, String), BTreeSet<String>> = BTreeMap::new();
        let previous = std::mem::take(&mut self.firewalls);
        for (gname, r) in rendered {
            let Some(pname) = self
                .snap
                .groups
                .get(&gname)
                .and_then(|g| g.spec.profile.clone())
            else {
                continue;
            };
            if profile_errors.contains_key(&pname) {
                continue;
            }
            let (ipv4, ipv6) = match previous.get(&gname) {
                Some((p, _, _)) if *p.ipv4 == r.ipv4 && *p.ipv6 == r.ipv6 => {
                    (p.ipv4.clone(), p.ipv6.clone())
                }
                _ => (Arc::new(r.ipv4), Arc::new(r.ipv6)),
            };
            for s in &r.sources {
                users.entry(s.clone()).or_default().insert(gname.clone());
            }
            let fw = self.make_firewall(&gname, &pname, ipv4, ipv6, &r.sources);
            let fw = match previous.get(&gname) {
                Some((p, _, _)) if **p == fw => p.clone(),
                _ => Arc::new(fw),
            };
            firewalls.insert(
                gname.clone(),
                (
                    fw,
                    running.get(&gname).cloned().unwrap_or_default(),
                    r.sources,
                ),
            );
        }

        // ---- host outcomes
        for (h, r) in resolutions {
            let outcome = match r {
                Resolution::Unmanaged => HostOutcome::Unmanaged,
                Resolution::Conflict { groups } => HostOutcome::Conflict { groups },
                Resolution::Runs { group, profile } => match firewalls.get(&group) {
                    Some((fw, _, _)) => HostOutcome::Firewall {
                        group,
                        profile,
                        firewall: fw.clone(),
                    },
                    None => HostOutcome::Withheld { group, profile },
                },
            };
            out.hosts.insert(h, outcome);
        }
        for (g, hosts) in &running {
            if let Some(s) = out.groups.get_mut(g) {
                s.hosts_running = hosts.clone();
            }
        }

        // ---- sets used by some host
        for (fw, _, _) in firewalls.values() {
            for (n, s) in &fw.sets {
                if !out.sets.contains_key(n) {
                    let (s, h) = self.hash_of(s);
                    out.set_hashes.insert(n.clone(), h);
                    out.sets.insert(n.clone(), s);
                }
            }
        }
        self.hash_cache.retain(|n, _| out.sets.contains_key(n));

        // ---- forget remembered sets no rule needs any more
        let current = (&self.zone_sets, &self.group_sets);
        self.remembered.retain(|key, _| {
            let exists = match key.0 {
                SetSource::Zone => current.0.contains_key(&key.1),
                SetSource::Group => current.1.contains_key(&key.1),
            };
            !exists && users.contains_key(key)
        });

        self.firewalls = firewalls;
        self.users = users;
        self.other_diags = diags;
        self.out = out;
        self.merge_diagnostics();

        // ---- what changed
        let mut changes = Changes {
            full: true,
            ..Default::default()
        };
        for (h, o) in &self.out.hosts {
            if old.hosts.get(h).is_none_or(|p| !same_outcome(p, o)) {
                changes.hosts.insert(h.clone());
            }
        }
        for h in old.hosts.keys() {
            if !self.out.hosts.contains_key(h) {
                changes.hosts.insert(h.clone());
            }
        }
        for (n, h) in &self.out.set_hashes {
            if old.set_hashes.get(n) != Some(h) {
                changes.sets.insert(n.clone());
            }
        }
        for n in old.set_hashes.keys() {
            if !self.out.set_hashes.contains_key(n) {
                changes.sets.insert(n.clone());
            }
        }
        changes
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

fn make_pair(src: SetSource, name: &str, nets: Vec<IpNet>) -> SetPair {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
        nets.into_iter().partition(|n| Family::of(n) == Family::V4);
    SetPair {
        v4: Arc::new(IpSet::new(set_name(src, name, Family::V4), Family::V4, v4)),
        v6: Arc::new(IpSet::new(set_name(src, name, Family::V6), Family::V6, v6)),
    }
}

pub(crate) fn config_map_key(r: &crate::crd::ConfigMapAddressSource) -> String {
    format!(
        "{}/{}/{}",
        r.namespace,
        r.name,
        r.key.as_deref().unwrap_or("addresses")
    )
}

/// A zone's two sets, its status figures and its diagnostics (invalid entries are dropped).
fn build_zone(
    name: &str,
    zone: &Zone,
    config_maps: &BTreeMap<String, Arc<Vec<String>>>,
) -> (SetPair, ZoneSummary, Vec<Diagnostic>) {
    let mut nets = Vec::with_capacity(zone.spec.addresses.len());
    let mut invalid: Vec<(String, String)> = Vec::new();
    // entries such as 10.91.0.200/24 are applied as their network; said, never silent
    let mut normalized: Vec<(String, String)> = Vec::new();
    let mut note_host_bits = |field: &dyn Fn() -> String, text: &str, n: &IpNet| {
        if n.trunc() != *n {
            normalized.push((
                field(),
                format!(
                    "`{}` has host bits set; applied as {}",
                    text.trim(),
                    n.trunc()
                ),
            ));
        }
    };
    for (i, a) in zone.spec.addresses.iter().enumerate() {
        match parse_entry(a) {
            Ok(n) => {
                note_host_bits(&|| format!("spec.addresses[{i}]"), a, &n);
                nets.push(n)
            }
            Err(m) => invalid.push((format!("spec.addresses[{i}]"), m)),
        }
    }
    let mut diags = Vec::new();
    for (i, r) in zone.spec.config_map_refs.iter().enumerate() {
        let key = config_map_key(r);
        match config_maps.get(&key) {
            None => diags.push(Diagnostic {
                kind: ObjectKind::Zone,
                name: name.to_string(),
                field: format!("spec.configMapRefs[{i}]"),
                reason: Reason::DanglingReference,
                message: format!("ConfigMap key `{key}` does not exist"),
                severity: Severity::Error,
            }),
            Some(lines) => {
                for (li, line) in lines.iter().enumerate() {
                    let entry = line.split('#').next().unwrap_or("").trim();
                    if entry.is_empty() {
                        continue;
                    }
                    match parse_entry(entry) {
                        Ok(n) => {
                            note_host_bits(
                                &|| format!("spec.configMapRefs[{i}] ({key} line {})", li + 1),
                                entry,
                                &n,
                            );
                            nets.push(n)
                        }
                        Err(m) => invalid.push((
                            format!("spec.configMapRefs[{i}] ({key} line {})", li + 1),
                            m,
                        )),
                    }
                }
            }
        }
    }
    let pair = make_pair(SetSource::Zone, name, nets);
    let summary = ZoneSummary {
        ipv4_count: pair.v4.members.len() as u64,
        ipv6_count: pair.v6.members.len() as u64,
        invalid_count: invalid.len() as u64,
        invalid_entries: invalid
            .iter()
            .take(INVALID_LISTED)
            .map(|(f, m)| format!("{f}: {m}"))
            .collect(),
    };
    for (f, m) in invalid.iter().take(INVALID_LISTED) {
        diags.push(Diagnostic {
            kind: ObjectKind::Zone,
            name: name.to_string(),
            field: f.clone(),
            reason: Reason::InvalidAddress,
            message: format!("{m}; entry dropped"),
            severity: Severity::Error,
        });
    }
    for (f, m) in normalized.iter().take(INVALID_LISTED) {
        diags.push(Diagnostic {
            kind: ObjectKind::Zone,
            name: name.to_string(),
            field: f.clone(),
            reason: Reason::HostBitsSet,
            message: m.clone(),
            severity: Severity::Warning,
        });
    }
    if normalized.len() > INVALID_LISTED {
        diags.push(Diagnostic {
            kind: ObjectKind::Zone,
            name: name.to_string(),
            field: "spec".into(),
            reason: Reason::HostBitsSet,
            message: format!(
                "{} more entries with host bits set, applied as their networks",
                normalized.len() - INVALID_LISTED
            ),
            severity: Severity::Warning,
        });
    }
    if invalid.len() > INVALID_LISTED {
        diags.push(Diagnostic {
            kind: ObjectKind::Zone,
            name: name.to_string(),
            field: "spec".into(),
            reason: Reason::InvalidAddress,
            message: format!(
                "{} more invalid entries dropped",
                invalid.len() - INVALID_LISTED
            ),
            severity: Severity::Error,
        });
    }
    (pair, summary, diags)
}

/// The ranges, beyond the operator's, within which `name`'s reported addresses are believed:
/// its own and its Groups' `spec.trustReportedAddresses`. A Host entry that does not parse is
/// reported on the Host (a Group's by the group-sets pass) and trusts nothing.
fn trusted_ranges(
    name: &str,
    host: &Host,
    groups: &[String],
    all_groups: &BTreeMap<String, Group>,
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

/// At most this many refused reported addresses are listed per host.
const UNTRUSTED_LISTED: usize = 8;

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
/// reported interface addresses that lie within `trusted`. A reported address outside is not
/// used: a compromised agent must not put addresses it does not own into other hosts' sets.
fn host_addresses(
    name: &str,
    host: &Host,
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
    if let Some(st) = &host.status {
        for (i, iface) in st.interfaces.iter().enumerate() {
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
