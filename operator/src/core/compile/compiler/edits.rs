//! From input changes to what they invalidate: the edits between two snapshots, and what each
//! edit marks dirty for the phases.

use super::*;

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
    /// The edits from the current inputs to `new`.
    pub(super) fn edits_to(&self, new: &Snapshot) -> Vec<Edit> {
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

    pub(super) fn record(&mut self, edit: Edit, d: &mut Dirty) {
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
    pub(super) fn mark_all(&self, d: &mut Dirty) {
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
}
