//! Pure planning of dog's ipset changes: what to create, swap, change by delta or destroy, and
//! the `ipset restore` scripts that do it.

use crate::core::members::{Members, MembersBuilder, SetContent};
use dog_protocol::messages::SetDelta;
use dog_protocol::ruleset::{
    maxelem_for, parse_member, sha256_hex, write_member, Family, SET_NAME_MAX, SET_PREFIX,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

/// Prefix of the temporary sets used to replace a set by swap.
pub const TEMP_PREFIX: &str = "dogtmp-";

/// A set as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSet {
    pub name: String,
    /// `hash:net`, … (the set's type).
    pub kind: String,
    pub maxelem: usize,
    /// How many members the kernel says it holds, when it said.
    pub elements: Option<usize>,
    pub members: Members,
}

/// One write to the kernel's sets. Adds and deletes are strict: adding a member that is there,
/// or deleting one that is not, fails (so what was acknowledged is what changed).
#[derive(Clone, Copy, Debug)]
pub enum SetOp<'a> {
    /// Creates set `name` (which must not exist) holding `set`'s members.
    Fill {
        name: &'a str,
        set: &'a SetContent,
    },
    Add {
        name: &'a str,
        members: &'a [IpNet],
    },
    Del {
        name: &'a str,
        members: &'a [IpNet],
    },
    Swap(&'a str, &'a str),
    Destroy(&'a str),
}

/// One of dog's sets as it is in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSet {
    /// The members read back (shared with the desired set when they are equal).
    pub content: Arc<SetContent>,
    /// `hash:net`, … (the `create` line's type word).
    pub kind: String,
    pub maxelem: usize,
}

impl LiveSet {
    pub fn family(&self) -> Family {
        self.content.family()
    }
}

impl LiveSet {
    /// A set as read from the kernel. Its members, when equal to those of the same-named set
    /// in `known`, share that set's content (and so its hash: the hash of identical members);
    /// any other set is hashed from what was read.
    pub fn from_read(read: ReadSet, known: &BTreeMap<String, Arc<SetContent>>) -> Self {
        let content = match known.get(&read.name) {
            Some(k) if k.members == read.members && k.name == read.name => Arc::clone(k),
            _ => Arc::new(SetContent::new(read.name, read.members)),
        };
        LiveSet {
            content,
            kind: read.kind,
            maxelem: read.maxelem,
        }
    }
}

/// A set seen in `ipset save` output, members still being collected.
#[derive(Debug)]
struct Reading {
    kind: String,
    maxelem: usize,
    members: MembersBuilder,
}

/// Reads `ipset save` output line by line (see [`crate::kernel::cli_sets::save_lines`]),
/// keeping only dog's sets and only their packed members: no copy of the text, no `IpNet` list.
#[derive(Debug, Default)]
pub struct SaveReader {
    sets: BTreeMap<String, Reading>,
}

impl SaveReader {
    pub fn line(&mut self, line: &str) {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("create") => {
                let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                    return;
                };
                if !name.starts_with(SET_PREFIX) {
                    return;
                }
                let rest: Vec<&str> = w.collect();
                let opt = |key: &str| rest.windows(2).find(|p| p[0] == key).map(|p| p[1]);
                let family = match opt("family") {
                    Some("inet6") => Family::V6,
                    _ => Family::V4,
                };
                let maxelem = opt("maxelem").and_then(|v| v.parse().ok()).unwrap_or(65536);
                self.sets.insert(
                    name.to_string(),
                    Reading {
                        kind: kind.to_string(),
                        maxelem,
                        members: MembersBuilder::new(family),
                    },
                );
            }
            Some("add") => {
                let (Some(name), Some(member)) = (w.next(), w.next()) else {
                    return;
                };
                if let Some(r) = self.sets.get_mut(name) {
                    if let Some(net) = parse_member(member) {
                        r.members.push(net);
                    }
                }
            }
            _ => {}
        }
    }

    /// The sets read.
    pub fn finish(self) -> Vec<ReadSet> {
        self.sets
            .into_iter()
            .map(|(name, r)| ReadSet {
                name,
                kind: r.kind,
                maxelem: r.maxelem,
                elements: None,
                members: r.members.finish(),
            })
            .collect()
    }
}

/// Parses `ipset save` text into dog's sets with their metadata (foreign sets are skipped).
pub fn parse_live_sets(save_text: &str) -> BTreeMap<String, LiveSet> {
    let mut r = SaveReader::default();
    save_text.lines().for_each(|l| r.line(l));
    r.finish()
        .into_iter()
        .map(|s| (s.name.clone(), LiveSet::from_read(s, &BTreeMap::new())))
        .collect()
}

/// `ipset save` text of sets as read (what a dump request shows).
pub fn render_save(sets: &[ReadSet]) -> String {
    let mut out = String::new();
    for s in sets {
        out.push_str(&format!(
            "create {} {} family {} hashsize {} maxelem {}\n",
            s.name,
            s.kind,
            s.members.family().ipset_family(),
            hashsize_for(s.members.len()),
            s.maxelem
        ));
        for m in s.members.iter() {
            out.push_str("add ");
            out.push_str(&s.name);
            out.push(' ');
            write_member(&mut out, &m);
            out.push('\n');
        }
    }
    out
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

/// The most member changes to a set of `new_len` members that are cheaper as a delta (add/del
/// lines) than as a fill-and-swap.
fn delta_limit(new_len: usize) -> usize {
    64.max(new_len / 2)
}

/// Plans the set changes from desired to live (pure).
pub fn plan_sets(
    desired: &BTreeMap<String, Arc<SetContent>>,
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
        if have.kind != "hash:net" || have.family() != want.family() {
            return Err(SetPlanError::Incompatible {
                name: name.clone(),
                live_kind: have.kind.clone(),
                live_family: have.family(),
                want: want.family(),
            });
        }
        if Arc::ptr_eq(&have.content, want) || have.content.members == want.members {
            plan.unchanged.push(name.clone());
            continue;
        }
        let limit = delta_limit(want.members.len());
        match want.members.diff_within(&have.content.members, limit) {
            Some((add, remove)) if want.members.len() <= have.maxelem => {
                plan.delta.push(SetDelta {
                    name: name.clone(),
                    add,
                    remove,
                })
            }
            _ => plan.swap.push(name.clone()),
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

/// Writes the `create` + `add` lines filling `set` under the name `as_name`, member by member
/// (the agent streams this into `ipset restore` instead of building the script first).
pub fn write_fill(w: &mut impl io::Write, set: &SetContent, as_name: &str) -> io::Result<()> {
    let len = set.members.len();
    writeln!(
        w,
        "create {as_name} hash:net family {} hashsize {} maxelem {}",
        set.family().ipset_family(),
        hashsize_for(len),
        maxelem_for(len)
    )?;
    let mut line = String::with_capacity(as_name.len() + 48);
    for m in set.members.iter() {
        line.clear();
        line.push_str("add ");
        line.push_str(as_name);
        line.push(' ');
        write_member(&mut line, &m);
        line.push('\n');
        w.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// [`write_fill`] into a string.
pub fn render_fill(out: &mut String, set: &SetContent, as_name: &str) {
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_fill(&mut buf, set, as_name);
    out.push_str(&String::from_utf8_lossy(&buf));
}

/// Applies a delta to a set's members (pure): the result is canonical and hashed.
pub fn apply_delta(set: &SetContent, delta: &SetDelta) -> SetContent {
    let del: std::collections::BTreeSet<IpNet> = delta.remove.iter().map(|m| m.trunc()).collect();
    let mut b = MembersBuilder::new(set.family());
    set.members
        .iter()
        .filter(|m| !del.contains(m))
        .chain(delta.add.iter().copied())
        .for_each(|m| b.push(m));
    SetContent::new(set.name.clone(), b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::members::Members;

    fn net(s: &str) -> IpNet {
        parse_member(s).unwrap()
    }

    fn set(name: &str, members: &[&str]) -> Arc<SetContent> {
        Arc::new(SetContent::new(
            name,
            Members::new(Family::V4, members.iter().map(|m| net(m))),
        ))
    }

    fn live(s: Arc<SetContent>) -> LiveSet {
        LiveSet {
            maxelem: maxelem_for(s.members.len()),
            content: s,
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
        assert_eq!(a.content, set("dogz4-a", &["1.2.3.4/32", "10.0.0.0/8"]));
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
        assert_eq!(p.delta[0].remove, vec![net("10.1.0.0/24")]);
        assert!(p.delta[0].add.is_empty());
        assert!(temp_name("dogbig").len() <= SET_NAME_MAX);
    }

    #[test]
    fn refuses_family_change_and_foreign_names() {
        let mut desired = BTreeMap::new();
        desired.insert(
            "dogx".to_string(),
            Arc::new(SetContent::new(
                "dogx",
                Members::new(Family::V6, [net("fd00::/64")]),
            )),
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
            remove: vec![net("1.1.1.1/32")],
        };
        assert_eq!(
            apply_delta(&s, &d),
            *set("dogx", &["2.2.2.0/24", "3.3.3.0/24"])
        );
    }

    #[test]
    fn read_back_shares_equal_known_content_and_hashes_the_rest() {
        let known: BTreeMap<String, Arc<SetContent>> = [
            (
                "dogz4-a".to_string(),
                set("dogz4-a", &["1.2.3.4/32", "10.0.0.0/8"]),
            ),
            ("dogz4-b".to_string(), set("dogz4-b", &["5.5.5.5/32"])),
        ]
        .into_iter()
        .collect();
        // the kernel prints members in hash order, not sorted
        let text = "create dogz4-a hash:net family inet hashsize 64 maxelem 65536\nadd dogz4-a 10.0.0.0/8\nadd dogz4-a 1.2.3.4\ncreate dogz4-b hash:net family inet hashsize 64 maxelem 65536\nadd dogz4-b 6.6.6.6\n";
        let mut r = SaveReader::default();
        text.lines().for_each(|l| r.line(l));
        let sets: BTreeMap<String, LiveSet> = r
            .finish()
            .into_iter()
            .map(|s| (s.name.clone(), LiveSet::from_read(s, &known)))
            .collect();
        assert!(Arc::ptr_eq(&sets["dogz4-a"].content, &known["dogz4-a"]));
        let b = &sets["dogz4-b"].content;
        assert!(!Arc::ptr_eq(b, &known["dogz4-b"]));
        assert_eq!(b.hash(), set("dogz4-b", &["6.6.6.6/32"]).hash());
        assert_eq!(
            parse_live_sets(text)["dogz4-a"].content.hash(),
            known["dogz4-a"].hash()
        );
    }

    #[test]
    fn one_entry_change_of_a_large_set_is_a_delta() {
        let base: Vec<String> = (0..10_000u32)
            .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string())
            .collect();
        let base_ref: Vec<&str> = base.iter().map(String::as_str).collect();
        let mut more = base_ref.clone();
        more.push("192.0.2.1");
        let desired: BTreeMap<String, Arc<SetContent>> =
            [("dogbig".to_string(), set("dogbig", &more))]
                .into_iter()
                .collect();
        let have: BTreeMap<String, LiveSet> =
            [("dogbig".to_string(), live(set("dogbig", &base_ref[1..])))]
                .into_iter()
                .collect();
        let p = plan_sets(&desired, &have).unwrap();
        assert_eq!(
            p.delta,
            vec![SetDelta {
                name: "dogbig".into(),
                add: vec![net("10.0.0.0/32"), net("192.0.2.1/32")],
                remove: vec![],
            }]
        );
        let mut fill = String::new();
        render_fill(
            &mut fill,
            &set("dogs", &["1.1.1.1", "10.0.0.0/8"]),
            "dogtmp-x",
        );
        assert_eq!(
            fill,
            "create dogtmp-x hash:net family inet hashsize 64 maxelem 65536\nadd dogtmp-x 1.1.1.1\nadd dogtmp-x 10.0.0.0/8\n"
        );
    }
}
