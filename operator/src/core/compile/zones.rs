//! A Zone's two sets, kept up to date entry by entry: a changed zone is compared with the
//! version its sets were built from, only the entries between the unchanged beginning and end
//! are parsed again, and a count per member says when a member appears or disappears. One
//! entry changed in a 500,000-entry blocklist costs a scan and a copy of the members, not a
//! parse, sort and re-hash of the whole list.
//!
//! The entries come from `spec.addresses` and from each ConfigMap the zone references (one
//! entry per line, `#` starts a comment). An entry that does not parse is dropped and
//! reported; one with host bits set is applied as its network and reported.

use super::addresses::parse_entry;
use super::compiler::config_map_key;
use super::setname::{set_name, SetSource};
use super::{same_sets, Diagnostic, ObjectKind, Reason, SetPair, Severity, ZoneSummary};
use crate::crd::Zone;
use dog_protocol::ruleset::{Family, IpSet};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// How many invalid (and how many normalized) entries of one zone are reported individually.
const LISTED: usize = 20;

/// One entry as parsed.
#[derive(Clone, Debug)]
enum Entry {
    /// A blank or comment-only ConfigMap line.
    Blank,
    /// As written (host bits not yet cleared).
    Net(IpNet),
    Invalid(String),
}

/// Where a zone's entries come from, in order: `spec.addresses`, then each ConfigMap key.
#[derive(Clone, Debug)]
enum Origin {
    Spec,
    /// `namespace/name/key` and its lines as parsed (`None`: the key does not exist).
    Map {
        key: String,
        lines: Option<Arc<Vec<String>>>,
    },
}

#[derive(Clone, Debug)]
struct Source {
    origin: Origin,
    entries: Vec<Entry>,
}

/// What an update did to a zone's members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Moved {
    Same,
    /// Rebuilt from scratch (its ConfigMap references changed): different members.
    Rebuilt,
    /// These members appeared and these left (sorted; both families).
    Members {
        added: Vec<IpNet>,
        removed: Vec<IpNet>,
    },
}

/// A zone's sets and what they were built from.
#[derive(Clone, Debug)]
pub(super) struct ZoneBuild {
    zone: Arc<Zone>,
    sources: Vec<Source>,
    /// Canonical member → how many entries give it.
    counts: HashMap<IpNet, u32>,
    pub pair: SetPair,
    pub summary: ZoneSummary,
    pub diags: Vec<Diagnostic>,
}

/// The canonical members an entry stands for: host bits cleared, a `/0` as its two halves
/// (`hash:net` cannot hold a `/0`), exactly as [`IpSet::new`] stores them.
fn canonical(net: &IpNet) -> impl Iterator<Item = IpNet> {
    let halves = if net.prefix_len() == 0 {
        net.subnets(1).map(|s| s.collect()).unwrap_or_default()
    } else {
        vec![net.trunc()]
    };
    halves.into_iter()
}

fn parse_spec(text: &str) -> Entry {
    match parse_entry(text) {
        Ok(n) => Entry::Net(n),
        Err(m) => Entry::Invalid(m),
    }
}

fn parse_line(line: &str) -> Entry {
    let entry = line.split('#').next().unwrap_or("").trim();
    if entry.is_empty() {
        Entry::Blank
    } else {
        parse_spec(entry)
    }
}

/// The span of `new` that differs from `old`, and the span of `old` it replaces: everything
/// before is a common beginning, everything after a common end.
fn changed_span<T: PartialEq>(
    old: &[T],
    new: &[T],
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let start = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let room = old.len().min(new.len()) - start;
    let end = old[start..]
        .iter()
        .rev()
        .zip(new[start..].iter().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    (start..old.len() - end, start..new.len() - end)
}

/// Member counts being changed, remembering whether each touched member was present before.
struct Tally<'a> {
    counts: &'a mut HashMap<IpNet, u32>,
    before: HashMap<IpNet, bool>,
}

impl Tally<'_> {
    fn change(&mut self, entry: &Entry, up: bool) {
        let Entry::Net(net) = entry else { return };
        for m in canonical(net) {
            let n = self.counts.entry(m).or_default();
            self.before.entry(m).or_insert(*n > 0);
            if up {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Members that appeared and members that disappeared.
    fn finish(self) -> (Vec<IpNet>, Vec<IpNet>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (m, was) in self.before {
            let now = self.counts.get(&m).is_some_and(|n| *n > 0);
            if now && !was {
                added.push(m);
            } else if was && !now {
                removed.push(m);
                self.counts.remove(&m);
            } else if !now {
                self.counts.remove(&m);
            }
        }
        added.sort_unstable();
        removed.sort_unstable();
        (added, removed)
    }
}

/// `old` members without `removed`, with `added` (all three sorted).
fn merged(old: &[IpNet], added: &[IpNet], removed: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(old.len() + added.len());
    let (mut a, mut r) = (added.iter().peekable(), removed.iter().peekable());
    for m in old {
        while let Some(x) = a.next_if(|x| *x < m) {
            out.push(*x);
        }
        if r.next_if(|x| *x == m).is_some() {
            continue;
        }
        out.push(*m);
    }
    out.extend(a);
    out
}

fn origins(zone: &Zone, maps: &BTreeMap<String, Arc<Vec<String>>>) -> Vec<Origin> {
    std::iter::once(Origin::Spec)
        .chain(zone.spec.config_map_refs.iter().map(|r| {
            let key = config_map_key(r);
            let lines = maps.get(&key).cloned();
            Origin::Map { key, lines }
        }))
        .collect()
}

impl ZoneBuild {
    /// Builds `name`'s sets from scratch.
    pub fn new(name: &str, zone: &Arc<Zone>, maps: &BTreeMap<String, Arc<Vec<String>>>) -> Self {
        let sources: Vec<Source> = origins(zone, maps)
            .into_iter()
            .map(|origin| {
                let entries = match &origin {
                    Origin::Spec => zone.spec.addresses.iter().map(|a| parse_spec(a)).collect(),
                    Origin::Map { lines, .. } => lines
                        .iter()
                        .flat_map(|l| l.iter())
                        .map(|l| parse_line(l))
                        .collect(),
                };
                Source { origin, entries }
            })
            .collect();
        let mut counts: HashMap<IpNet, u32> = HashMap::new();
        let mut members: Vec<IpNet> = Vec::new();
        for e in sources.iter().flat_map(|s| &s.entries) {
            if let Entry::Net(net) = e {
                for m in canonical(net) {
                    let n = counts.entry(m).or_default();
                    if *n == 0 {
                        members.push(m);
                    }
                    *n += 1;
                }
            }
        }
        members.sort_unstable();
        let mut b = ZoneBuild {
            zone: zone.clone(),
            sources,
            counts,
            pair: pair_of(name, &members),
            summary: ZoneSummary::default(),
            diags: Vec::new(),
        };
        b.describe(name);
        b
    }

    /// Moves to `zone` (and the ConfigMap lines it now reads): what happened to its members.
    pub fn update(
        &mut self,
        name: &str,
        zone: &Arc<Zone>,
        maps: &BTreeMap<String, Arc<Vec<String>>>,
    ) -> Moved {
        let wanted = origins(zone, maps);
        let same_layout = wanted.len() == self.sources.len()
            && wanted
                .iter()
                .zip(&self.sources)
                .all(|(w, s)| match (w, &s.origin) {
                    (Origin::Spec, Origin::Spec) => true,
                    (Origin::Map { key: a, .. }, Origin::Map { key: b, .. }) => a == b,
                    _ => false,
                });
        if !same_layout {
            let before = self.pair.clone();
            *self = ZoneBuild::new(name, zone, maps);
            return if same_sets(&self.pair, &before) {
                Moved::Same
            } else {
                Moved::Rebuilt
            };
        }
        let mut tally = Tally {
            counts: &mut self.counts,
            before: HashMap::new(),
        };
        let old_zone = std::mem::replace(&mut self.zone, zone.clone());
        for (source, origin) in self.sources.iter_mut().zip(wanted) {
            let fresh: Vec<Entry>;
            let was = match (&source.origin, &origin) {
                (Origin::Spec, Origin::Spec) => {
                    let (old, new) = (&old_zone.spec.addresses, &zone.spec.addresses);
                    if Arc::ptr_eq(&old_zone, zone) {
                        continue;
                    }
                    // one pass from each end; equal lists leave empty spans
                    let (was, now) = changed_span(old, new);
                    if was.is_empty() && now.is_empty() {
                        continue;
                    }
                    fresh = new[now].iter().map(|a| parse_spec(a)).collect();
                    was
                }
                (Origin::Map { lines: old, .. }, Origin::Map { lines: new, .. }) => {
                    let same = match (old, new) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    };
                    if same {
                        source.origin = origin;
                        continue;
                    }
                    let empty = Vec::new();
                    let old_lines = old.as_deref().unwrap_or(&empty);
                    let new_lines = new.as_deref().unwrap_or(&empty);
                    let (was, now) = changed_span(old_lines, new_lines);
                    if was.is_empty() && now.is_empty() {
                        source.origin = origin;
                        continue;
                    }
                    fresh = new_lines[now].iter().map(|l| parse_line(l)).collect();
                    was
                }
                // the layouts were compared above
                _ => continue,
            };
            for e in &fresh {
                tally.change(e, true);
            }
            for e in source.entries.splice(was, fresh) {
                tally.change(&e, false);
            }
            source.origin = origin;
        }
        let (added, removed) = tally.finish();
        let changed = !added.is_empty() || !removed.is_empty();
        if changed {
            let by_family = |f: Family| {
                let pick = |v: &[IpNet]| -> Vec<IpNet> {
                    v.iter().filter(|m| Family::of(m) == f).copied().collect()
                };
                merged(&self.pair.get(f).members, &pick(&added), &pick(&removed))
            };
            let (v4, v6) = (by_family(Family::V4), by_family(Family::V6));
            self.pair = SetPair {
                v4: Arc::new(IpSet {
                    name: set_name(SetSource::Zone, name, Family::V4),
                    family: Family::V4,
                    members: v4,
                }),
                v6: Arc::new(IpSet {
                    name: set_name(SetSource::Zone, name, Family::V6),
                    family: Family::V6,
                    members: v6,
                }),
            };
        }
        self.describe(name);
        if changed {
            Moved::Members { added, removed }
        } else {
            Moved::Same
        }
    }

    /// The summary and diagnostics of the entries as they are now.
    fn describe(&mut self, name: &str) {
        let diag = |field: String, reason, message, severity| Diagnostic {
            kind: ObjectKind::Zone,
            name: name.to_string(),
            field,
            reason,
            message,
            severity,
        };
        let mut diags = Vec::new();
        let (mut invalid, mut normalized) = (0usize, 0usize);
        let mut listed_invalid = Vec::new();
        let refs = &self.zone.spec.config_map_refs;
        for (si, source) in self.sources.iter().enumerate() {
            let texts: Option<&[String]> = match &source.origin {
                Origin::Spec => Some(&self.zone.spec.addresses),
                Origin::Map { lines, key } => {
                    if lines.is_none() {
                        diags.push(diag(
                            format!("spec.configMapRefs[{}]", si - 1),
                            Reason::DanglingReference,
                            format!("ConfigMap key `{key}` does not exist"),
                            Severity::Error,
                        ));
                    }
                    lines.as_deref().map(|l| l.as_slice())
                }
            };
            let field = |i: usize| match &source.origin {
                Origin::Spec => format!("spec.addresses[{i}]"),
                Origin::Map { key, .. } => {
                    format!("spec.configMapRefs[{}] ({key} line {})", si - 1, i + 1)
                }
            };
            debug_assert!(si == 0 || si - 1 < refs.len());
            for (i, e) in source.entries.iter().enumerate() {
                match e {
                    Entry::Blank => {}
                    Entry::Invalid(m) => {
                        if invalid < LISTED {
                            listed_invalid.push(format!("{}: {m}", field(i)));
                            diags.push(diag(
                                field(i),
                                Reason::InvalidAddress,
                                format!("{m}; entry dropped"),
                                Severity::Error,
                            ));
                        }
                        invalid += 1;
                    }
                    Entry::Net(n) if n.trunc() != *n => {
                        if normalized < LISTED {
                            let text = texts
                                .and_then(|t| t.get(i))
                                .map(|t| t.split('#').next().unwrap_or("").trim().to_string())
                                .unwrap_or_default();
                            diags.push(diag(
                                field(i),
                                Reason::HostBitsSet,
                                format!("`{text}` has host bits set; applied as {}", n.trunc()),
                                Severity::Warning,
                            ));
                        }
                        normalized += 1;
                    }
                    Entry::Net(_) => {}
                }
            }
        }
        if normalized > LISTED {
            diags.push(diag(
                "spec".into(),
                Reason::HostBitsSet,
                format!(
                    "{} more entries with host bits set, applied as their networks",
                    normalized - LISTED
                ),
                Severity::Warning,
            ));
        }
        if invalid > LISTED {
            diags.push(diag(
                "spec".into(),
                Reason::InvalidAddress,
                format!("{} more invalid entries dropped", invalid - LISTED),
                Severity::Error,
            ));
        }
        self.summary = ZoneSummary {
            ipv4_count: self.pair.v4.members.len() as u64,
            ipv6_count: self.pair.v6.members.len() as u64,
            invalid_count: invalid as u64,
            invalid_entries: listed_invalid,
        };
        self.diags = diags;
    }
}

/// The two sets of zone `name` from its distinct canonical members, sorted.
fn pair_of(name: &str, members: &[IpNet]) -> SetPair {
    let set = |f: Family| {
        Arc::new(IpSet {
            name: set_name(SetSource::Zone, name, f),
            family: f,
            members: members
                .iter()
                .filter(|m| Family::of(m) == f)
                .copied()
                .collect(),
        })
    };
    SetPair {
        v4: set(Family::V4),
        v6: set(Family::V6),
    }
}
