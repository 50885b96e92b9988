//! The phases, in the order `Compiler::run` calls them; each recomputes what is marked dirty
//! and marks what depends on it for the phases after it.

use super::*;

impl Compiler {
    /// Zones: their sets, summaries and diagnostics. A deleted zone's sets are remembered.
    pub(super) fn zone_phase(&mut self, d: &mut Dirty) {
        for name in std::mem::take(&mut d.zones) {
            let maps = &self.snap.config_map_addresses;
            match self.snap.zones.get(&name) {
                Some(zone) => {
                    let incremental = !d.full && self.zones.contains_key(&name);
                    let moved = match self.zones.get_mut(&name) {
                        Some(b) if incremental => b.update(&name, zone, maps),
                        old => {
                            let b = ZoneBuild::new(&name, zone, maps);
                            let same = old.is_some_and(|o| same_sets(&o.pair, &b.pair));
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
    pub(super) fn names_phase(&mut self, d: &mut Dirty) {
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
    pub(super) fn group_phase(&mut self, d: &mut Dirty) {
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
    pub(super) fn host_phase(&mut self, d: &mut Dirty) {
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
    pub(super) fn running_changed(&self, g: &str, flipped: bool, d: &mut Dirty) {
        d.group_summaries.insert(g.to_string());
        if let Some(p) = self.group_profiles.get(g) {
            d.profile_summaries.insert(p.clone());
            if flipped {
                d.profiles.insert(p.clone());
            }
        }
    }

    /// Group sets: members' addresses plus extra addresses.
    pub(super) fn group_set_phase(&mut self, d: &mut Dirty) {
        for g in std::mem::take(&mut d.group_sets) {
            let Some(group) = self.snap.groups.get(&g) else {
                continue;
            };
            let b = groups::build(&g, group, self.members.get(&g), &self.hosts);
            let changed = self
                .groups
                .get(&g)
                .is_none_or(|old| !same_sets(&old.pair, &b.pair));
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
    pub(super) fn group_profile_phase(&mut self, d: &mut Dirty) {
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
    pub(super) fn ref_check(&self, src: SetSource, name: &str) -> Result<(), RefProblem> {
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
    pub(super) fn profile_phase(&mut self, d: &mut Dirty) {
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
    /// whose content changed. A group whose rendering is unchanged only has the sets that
    /// moved put in its firewall ([`Firewalls::refresh`]).
    pub(super) fn firewall_phase(&mut self, d: &mut Dirty) -> BTreeSet<String> {
        let mut moved: BTreeMap<String, Vec<(SetSource, String)>> = BTreeMap::new();
        for s in std::mem::take(&mut d.sets) {
            for g in self.firewalls.users.get(&s).into_iter().flatten() {
                if !d.firewalls.contains(g) {
                    moved.entry(g.clone()).or_default().push(s.clone());
                }
            }
        }
        let (groups, zones, remembered) = (&self.groups, &self.zones, &self.remembered);
        // the current sets of a Group or Zone (its last ones when it is gone but remembered)
        let pair_of = |src: SetSource, n: &str| {
            match src {
                SetSource::Group => groups.get(n).map(|b| b.pair.clone()),
                SetSource::Zone => zones.get(n).map(|b| b.pair.clone()),
            }
            .or_else(|| remembered.get(&(src, n.to_string())).cloned())
        };
        let mut touched = BTreeSet::new();
        let rendered = std::mem::take(&mut d.firewalls)
            .into_iter()
            .map(|g| (g, None));
        let refreshed = moved.into_iter().map(|(g, m)| (g, Some(m)));
        for (g, sources) in rendered.chain(refreshed) {
            let previous = self.firewalls.by_group.get(&g).cloned();
            let entry = match (sources, &previous) {
                (Some(sources), Some(p)) => Some(self.firewalls.refresh(p, &sources, &pair_of)),
                _ => {
                    let profile = self.group_profiles.get(&g);
                    let rendering = profile
                        .and_then(|p| self.profiles.get(p))
                        .and_then(|b| b.rendered.get(&g));
                    match (profile, rendering) {
                        (Some(p), Some(r)) => Some(self.firewalls.make(
                            &g,
                            p,
                            r,
                            &self.failsafe,
                            previous.as_ref(),
                            &pair_of,
                        )),
                        _ => None,
                    }
                }
            };
            if self
                .firewalls
                .install(&g, entry, &mut self.out, &mut touched)
            {
                d.swaps.insert(g);
            }
        }
        self.firewalls.settle(&touched, &mut self.out)
    }

    /// Remembered sets are forgotten once their Group or Zone exists again, or no rule names
    /// it any more.
    pub(super) fn forget_phase(&mut self) {
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
    pub(super) fn summary_phase(&mut self, d: &Dirty) {
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

    pub(super) fn stale_diagnostics(&self) -> Vec<Diagnostic> {
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
    pub(super) fn set_diags(&mut self, producer: Producer, diags: Vec<Diagnostic>) {
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
