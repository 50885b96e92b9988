//! What a compile reports as changed, and how the reports of several compiles fold into one.

use super::*;

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
