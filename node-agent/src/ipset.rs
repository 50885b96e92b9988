//! Pure planning of dog's ipset changes: what to create, swap, change by delta or destroy, and
//! the `ipset restore` scripts that do it.

use dog_protocol::ruleset::{
    maxelem_for, member_text, parse_ipset_save, sha256_hex, Family, IpSet, SET_NAME_MAX, SET_PREFIX,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Prefix of the temporary sets used to replace a set by swap.
pub const TEMP_PREFIX: &str = "dogtmp-";

/// One of dog's sets as it is in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSet {
    pub set: IpSet,
    /// `hash:net`, … (the `create` line's type word).
    pub kind: String,
    pub maxelem: usize,
}

/// Parses `ipset save` text into dog's sets with their metadata (foreign sets are skipped).
pub fn parse_live_sets(save_text: &str) -> BTreeMap<String, LiveSet> {
    let mut meta: BTreeMap<&str, (String, usize)> = BTreeMap::new();
    for line in save_text.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("create") {
            continue;
        }
        let (Some(name), Some(kind)) = (w.next(), w.next()) else {
            continue;
        };
        if !name.starts_with(SET_PREFIX) {
            continue;
        }
        let rest: Vec<&str> = w.collect();
        let maxelem = rest
            .windows(2)
            .find(|p| p[0] == "maxelem")
            .and_then(|p| p[1].parse().ok())
            .unwrap_or(65536);
        meta.insert(name, (kind.to_string(), maxelem));
    }
    parse_ipset_save(save_text)
        .into_iter()
        .map(|(name, set)| {
            let (kind, maxelem) = meta
                .get(name.as_str())
                .cloned()
                .unwrap_or_else(|| ("hash:net".into(), 65536));
            (name, LiveSet { set, kind, maxelem })
        })
        .collect()
}

/// `hashsize` for a set of `len` members: sized so filling it needs no rehash.
pub fn hashsize_for(len: usize) -> usize {
    (len / 4).next_power_of_two().max(64)
}

/// The temporary set used to replace `name` by swap: stable, ≤ 31 characters.
pub fn temp_name(name: &str) -> String {
    let room = SET_NAME_MAX - TEMP_PREFIX.len();
    format!("{TEMP_PREFIX}{}", &sha256_hex(name.as_bytes())[..room])
}

/// Members to add to and remove from one set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SetDelta {
    pub name: String,
    pub add: Vec<IpNet>,
    pub del: Vec<IpNet>,
}

impl SetDelta {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.del.is_empty()
    }
}

/// Members of `want` missing from `have` and members of `have` not in `want` (both sorted).
pub fn member_diff(want: &[IpNet], have: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < have.len() {
        match (want.get(i), have.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                add.push(*a);
                i += 1;
            }
            (Some(_), Some(b)) => {
                del.push(*b);
                j += 1;
            }
            (Some(a), None) => {
                add.push(*a);
                i += 1;
            }
            (None, Some(b)) => {
                del.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (add, del)
}

/// What applying a set of desired sets to the live ones will do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SetPlan {
    /// Sets that do not exist yet: created and filled.
    pub create: Vec<String>,
    /// Sets replaced by filling a temporary set and swapping it in.
    pub swap: Vec<String>,
    /// Sets changed in place by adds and deletes.
    pub delta: Vec<SetDelta>,
    /// dog's sets no longer wanted (destroyed after the rules stop referencing them).
    pub destroy: Vec<String>,
    /// Left-over temporary sets from an interrupted apply (destroyed first).
    pub stale_temps: Vec<String>,
    pub unchanged: Vec<String>,
}

impl SetPlan {
    pub fn changes_anything(&self) -> bool {
        !(self.create.is_empty()
            && self.swap.is_empty()
            && self.delta.is_empty()
            && self.destroy.is_empty()
            && self.stale_temps.is_empty())
    }
}

/// A set whose name cannot be swapped in place.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetPlanError {
    #[error("set {name}: live set is {live_kind} {live_family:?}, desired hash:net {want:?}; dog set names must carry their family")]
    Incompatible {
        name: String,
        live_kind: String,
        live_family: Family,
        want: Family,
    },
    #[error("set {name}: name is not dog's (must start with `{SET_PREFIX}`, at most {SET_NAME_MAX} characters, not `{TEMP_PREFIX}…`)")]
    BadName { name: String },
}

/// Whether a change of `changes` members to a set of `new_len` is cheaper as a delta.
fn delta_is_cheaper(changes: usize, new_len: usize) -> bool {
    changes <= 64 || changes * 2 <= new_len
}

/// Plans the set changes from desired to live (pure).
pub fn plan_sets(
    desired: &BTreeMap<String, IpSet>,
    live: &BTreeMap<String, LiveSet>,
) -> Result<SetPlan, SetPlanError> {
    let mut plan = SetPlan::default();
    for (name, want) in desired {
        if !name.starts_with(SET_PREFIX)
            || name.len() > SET_NAME_MAX
            || name.starts_with(TEMP_PREFIX)
            || want.name != *name
        {
            return Err(SetPlanError::BadName { name: name.clone() });
        }
        let Some(have) = live.get(name) else {
            plan.create.push(name.clone());
            continue;
        };
        if have.kind != "hash:net" || have.set.family != want.family {
            return Err(SetPlanError::Incompatible {
                name: name.clone(),
                live_kind: have.kind.clone(),
                live_family: have.set.family,
                want: want.family,
            });
        }
        let (add, del) = member_diff(&want.members, &have.set.members);
        if add.is_empty() && del.is_empty() {
            plan.unchanged.push(name.clone());
        } else if want.members.len() <= have.maxelem
            && delta_is_cheaper(add.len() + del.len(), want.members.len())
        {
            plan.delta.push(SetDelta {
                name: name.clone(),
                add,
                del,
            });
        } else {
            plan.swap.push(name.clone());
        }
    }
    for name in live.keys() {
        if name.starts_with(TEMP_PREFIX) {
            plan.stale_temps.push(name.clone());
        } else if !desired.contains_key(name) {
            plan.destroy.push(name.clone());
        }
    }
    Ok(plan)
}

/// `create` + `add` lines filling `set` under the name `as_name`.
pub fn render_fill(out: &mut String, set: &IpSet, as_name: &str) {
    let len = set.members.len();
    let _ = writeln!(
        out,
        "create {as_name} hash:net family {} hashsize {} maxelem {}",
        set.family.ipset_family(),
        hashsize_for(len),
        maxelem_for(len)
    );
    for m in &set.members {
        let _ = writeln!(out, "add {as_name} {}", member_text(m));
    }
}

/// `add`/`del` lines of a delta (run with `ipset restore -exist`).
pub fn render_delta(out: &mut String, d: &SetDelta) {
    for m in &d.del {
        let _ = writeln!(out, "del {} {}", d.name, member_text(&m.trunc()));
    }
    for m in &d.add {
        let _ = writeln!(out, "add {} {}", d.name, member_text(&m.trunc()));
    }
}

/// Applies a delta to a set's members (pure): the result is canonical.
pub fn apply_delta(set: &IpSet, delta: &SetDelta) -> IpSet {
    let del: std::collections::BTreeSet<IpNet> = delta.del.iter().map(|m| m.trunc()).collect();
    IpSet::new(
        set.name.clone(),
        set.family,
        set.members
            .iter()
            .filter(|m| !del.contains(m))
            .copied()
            .chain(delta.add.iter().copied()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn set(name: &str, members: &[&str]) -> IpSet {
        IpSet::new(name, Family::V4, members.iter().map(|m| net(m)))
    }

    fn live(s: IpSet) -> LiveSet {
        LiveSet {
            maxelem: maxelem_for(s.members.len()),
            set: s,
            kind: "hash:net".into(),
        }
    }

    #[test]
    fn parses_only_dog_sets_with_metadata() {
        let text = "create foo hash:ip family inet hashsize 1024 maxelem 65536\nadd foo 1.1.1.1\ncreate dogz4-a hash:net family inet hashsize 64 maxelem 131072 bucketsize 12 initval 0x1\nadd dogz4-a 10.0.0.0/8\nadd dogz4-a 1.2.3.4\n";
        let sets = parse_live_sets(text);
        assert_eq!(sets.len(), 1);
        let a = &sets["dogz4-a"];
        assert_eq!(a.maxelem, 131072);
        assert_eq!(a.kind, "hash:net");
        assert_eq!(a.set, set("dogz4-a", &["1.2.3.4/32", "10.0.0.0/8"]));
    }

    #[test]
    fn plans_create_delta_swap_destroy() {
        let big: Vec<String> = (0..200).map(|i| format!("10.1.{i}.0/24")).collect();
        let big_ref: Vec<&str> = big.iter().map(String::as_str).collect();
        let mut desired = BTreeMap::new();
        desired.insert("dognew".to_string(), set("dognew", &["1.1.1.1/32"]));
        desired.insert("dogsame".to_string(), set("dogsame", &["2.2.2.2/32"]));
        desired.insert("dogsmall".to_string(), set("dogsmall", &big_ref[1..]));
        desired.insert("dogbig".to_string(), set("dogbig", &["9.9.9.9/32"]));
        let mut have = BTreeMap::new();
        have.insert("dogsame".to_string(), live(set("dogsame", &["2.2.2.2/32"])));
        have.insert("dogsmall".to_string(), live(set("dogsmall", &big_ref)));
        have.insert("dogbig".to_string(), live(set("dogbig", &big_ref)));
        have.insert("dogold".to_string(), live(set("dogold", &[])));
        have.insert(temp_name("dogbig"), live(set(&temp_name("dogbig"), &[])));
        let p = plan_sets(&desired, &have).unwrap();
        assert_eq!(p.create, vec!["dognew"]);
        assert_eq!(p.unchanged, vec!["dogsame"]);
        assert_eq!(p.swap, vec!["dogbig"]);
        assert_eq!(p.destroy, vec!["dogold"]);
        assert_eq!(p.stale_temps, vec![temp_name("dogbig")]);
        assert_eq!(p.delta.len(), 1);
        assert_eq!(p.delta[0].del, vec![net("10.1.0.0/24")]);
        assert!(p.delta[0].add.is_empty());
        assert!(temp_name("dogbig").len() <= SET_NAME_MAX);
    }

    #[test]
    fn refuses_family_change_and_foreign_names() {
        let mut desired = BTreeMap::new();
        desired.insert(
            "dogx".to_string(),
            IpSet::new("dogx", Family::V6, [net("fd00::/64")]),
        );
        let mut have = BTreeMap::new();
        have.insert("dogx".to_string(), live(set("dogx", &["1.1.1.1/32"])));
        assert!(matches!(
            plan_sets(&desired, &have),
            Err(SetPlanError::Incompatible { .. })
        ));
        let mut desired = BTreeMap::new();
        desired.insert("KUBE-X".to_string(), set("KUBE-X", &[]));
        assert!(matches!(
            plan_sets(&desired, &BTreeMap::new()),
            Err(SetPlanError::BadName { .. })
        ));
    }

    #[test]
    fn delta_application_is_canonical() {
        let s = set("dogx", &["1.1.1.1/32", "2.2.2.0/24"]);
        let d = SetDelta {
            name: "dogx".into(),
            add: vec![net("3.3.3.3/24")],
            del: vec![net("1.1.1.1/32")],
        };
        assert_eq!(
            apply_delta(&s, &d),
            set("dogx", &["2.2.2.0/24", "3.3.3.0/24"])
        );
        let mut text = String::new();
        render_delta(&mut text, &d);
        assert_eq!(text, "del dogx 1.1.1.1\nadd dogx 3.3.3.0/24\n");
    }
}
