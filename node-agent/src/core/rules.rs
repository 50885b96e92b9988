//! Pure handling of iptables text: checking that a document touches only dog's chains, reading
//! dog's chains and hook jumps out of `iptables-save`, and rendering the `--noflush` restore
//! documents that apply, roll back and remove them.

use dog_protocol::ruleset::{
    filter_lines, FilterLine, RulesDocument, CHAIN_INPUT, CHAIN_OUTPUT, CHAIN_PREFIX,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The built-in chains dog hooks, and the chain each jumps to.
pub const HOOKS: [(&str, &str); 2] = [("INPUT", CHAIN_INPUT), ("OUTPUT", CHAIN_OUTPUT)];

/// Chains of the filter table as `iptables-save` shows them, split into dog's and the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterState {
    /// dog's chains (declared ones, even when empty) with their `-A` lines in order.
    pub owned: BTreeMap<String, Vec<String>>,
    /// Rules of every other chain (built-in and foreign), in order.
    pub foreign: BTreeMap<String, Vec<String>>,
}

impl FilterState {
    /// Parses the filter table of a save (or restore) text; other tables are ignored.
    pub fn parse(text: &str) -> Self {
        let mut st = FilterState::default();
        for l in filter_lines(text) {
            match l {
                FilterLine::Chain(name) if name.starts_with(CHAIN_PREFIX) => {
                    st.owned.entry(name.to_string()).or_default();
                }
                FilterLine::Chain(_) => {}
                FilterLine::Rule { chain, line } => {
                    let map = if chain.starts_with(CHAIN_PREFIX) {
                        &mut st.owned
                    } else {
                        &mut st.foreign
                    };
                    map.entry(chain.to_string())
                        .or_default()
                        .push(line.to_string());
                }
            }
        }
        st
    }

    /// Where dog's jump from `builtin` to `target` stands.
    pub fn jump(&self, builtin: &str, target: &str) -> JumpState {
        let line = jump_line(builtin, target);
        let rules = self.foreign.get(builtin).map(Vec::as_slice).unwrap_or(&[]);
        let count = rules.iter().filter(|r| **r == line).count();
        match count {
            0 => JumpState::Missing,
            1 if rules[0] == line => JumpState::First,
            _ => JumpState::Misplaced { count },
        }
    }

    /// Rules in other chains that jump (or go) to one of dog's chains.
    pub fn jumps_into_dog(&self) -> Vec<&str> {
        self.foreign
            .values()
            .flatten()
            .filter(|r| target_of(r).is_some_and(|t| t.starts_with(CHAIN_PREFIX)))
            .map(String::as_str)
            .collect()
    }
}

/// The canonical hook rule, e.g. `-A INPUT -j DOG-INPUT`.
pub fn jump_line(builtin: &str, target: &str) -> String {
    format!("-A {builtin} -j {target}")
}

/// The `-j`/`-g` target of a rule line.
fn target_of(rule: &str) -> Option<&str> {
    let mut w = rule.split_whitespace();
    while let Some(word) = w.next() {
        if word == "-j" || word == "-g" || word == "--jump" || word == "--goto" {
            return w.next();
        }
    }
    None
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JumpState {
    /// Exactly one jump, first in the built-in chain.
    First,
    /// Present but not first, or more than once.
    Misplaced {
        count: usize,
    },
    Missing,
}

/// A document that would touch more than dog's chains.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocumentError {
    #[error("{family} document line {line}: `{text}`: {why}")]
    Line {
        family: dog_protocol::ruleset::Family,
        line: usize,
        text: String,
        why: &'static str,
    },
    #[error("{family} document: {why}")]
    Shape {
        family: dog_protocol::ruleset::Family,
        why: &'static str,
    },
}

/// Checks that a document is a filter-table restore text declaring and filling only dog's
/// chains, so restoring it with `--noflush` can touch nothing else.
pub fn validate_document(doc: &RulesDocument) -> Result<(), DocumentError> {
    let family = doc.family;
    let bad = |line: usize, text: &str, why: &'static str| DocumentError::Line {
        family,
        line,
        text: text.to_string(),
        why,
    };
    let mut declared: Vec<&str> = Vec::new();
    let mut seen_table = false;
    let mut committed = false;
    for (i, raw) in doc.text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if committed {
            return Err(bad(n, line, "content after COMMIT"));
        }
        if line == "*filter" {
            if seen_table {
                return Err(bad(n, line, "second table"));
            }
            seen_table = true;
            continue;
        }
        if !seen_table {
            return Err(bad(n, line, "only the *filter table may be restored"));
        }
        if line == "COMMIT" {
            committed = true;
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            let name = w.next().unwrap_or("");
            if !name.starts_with(CHAIN_PREFIX) {
                return Err(bad(n, line, "declares a chain dog does not own"));
            }
            if w.next() != Some("-") {
                return Err(bad(n, line, "a user chain has no policy"));
            }
            declared.push(name);
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if !declared.contains(&chain) {
                return Err(bad(
                    n,
                    line,
                    "appends to a chain the document does not declare",
                ));
            }
            if let Some(t) = target_of(line) {
                if t.starts_with(CHAIN_PREFIX) && !declared.contains(&t) {
                    return Err(bad(
                        n,
                        line,
                        "jumps to a dog chain the document does not declare",
                    ));
                }
            }
        } else {
            return Err(bad(
                n,
                line,
                "only chain declarations and -A lines are allowed",
            ));
        }
    }
    if !seen_table || !committed {
        return Err(DocumentError::Shape {
            family,
            why: "must be `*filter` … `COMMIT`",
        });
    }
    for (_, chain) in HOOKS {
        if !declared.contains(&chain) {
            return Err(DocumentError::Shape {
                family,
                why: "must declare DOG-INPUT and DOG-OUTPUT",
            });
        }
    }
    Ok(())
}

/// What a restore of `doc` over `live` would change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RulesPlan {
    /// Per-chain differences (empty when dog's chains already equal the document).
    pub chains: Vec<ChainDiff>,
    /// dog chains in the kernel that the document no longer declares (flushed and deleted).
    pub delete_chains: Vec<String>,
    /// Hook jumps to (re)insert first in their built-in chain, e.g. `INPUT -> DOG-INPUT`.
    pub fix_jumps: Vec<String>,
    /// The restore text to run; `None` when nothing changes.
    pub restore: Option<String>,
}

/// Differences of one of dog's chains between desired and live.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChainDiff {
    pub chain: String,
    /// The chain does not exist live (or is not wanted, for `extra_chain`).
    pub missing_chain: bool,
    pub extra_chain: bool,
    /// Desired lines absent live.
    pub missing: Vec<String>,
    /// Live lines not desired.
    pub extra: Vec<String>,
    /// Same lines, different order.
    pub reordered: bool,
}

/// Per-chain multiset difference of dog's chains.
pub fn diff_chains(
    want: &BTreeMap<String, Vec<String>>,
    have: &BTreeMap<String, Vec<String>>,
) -> Vec<ChainDiff> {
    let mut names: Vec<&String> = want.keys().chain(have.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let w = want.get(name);
        let h = have.get(name);
        if w == h {
            continue;
        }
        let wl = w.map(Vec::as_slice).unwrap_or(&[]);
        let hl = h.map(Vec::as_slice).unwrap_or(&[]);
        let missing = multiset_minus(wl, hl);
        let extra = multiset_minus(hl, wl);
        out.push(ChainDiff {
            chain: name.clone(),
            missing_chain: h.is_none(),
            extra_chain: w.is_none(),
            reordered: missing.is_empty() && extra.is_empty() && w.is_some() && h.is_some(),
            missing,
            extra,
        });
    }
    out
}

fn multiset_minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in b {
        *counts.entry(l).or_default() += 1;
    }
    a.iter()
        .filter(|l| match counts.get_mut(l.as_str()) {
            Some(c) if *c > 0 => {
                *c -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

/// Plans the restore of `doc` over the live filter table (pure). The document must have passed
/// [`validate_document`].
pub fn plan_rules(doc: &RulesDocument, live: &FilterState) -> RulesPlan {
    let want = FilterState::parse(&doc.text).owned;
    let chains = diff_chains(&want, &live.owned);
    let delete_chains: Vec<String> = live
        .owned
        .keys()
        .filter(|c| !want.contains_key(*c))
        .cloned()
        .collect();
    let mut fix = String::new();
    let mut fix_jumps = Vec::new();
    for (builtin, target) in HOOKS {
        let count = match live.jump(builtin, target) {
            JumpState::First => continue,
            JumpState::Missing => 0,
            JumpState::Misplaced { count } => count,
        };
        for _ in 0..count {
            let _ = writeln!(fix, "-D {builtin} -j {target}");
        }
        let _ = writeln!(fix, "-I {builtin} 1 -j {target}");
        fix_jumps.push(format!("{builtin} -> {target}"));
    }
    let restore = if chains.is_empty() && delete_chains.is_empty() && fix.is_empty() {
        None
    } else {
        let mut text = String::with_capacity(doc.text.len() + fix.len() + 64);
        for line in doc.text.lines() {
            if line.trim() != "COMMIT" {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(&fix);
        push_delete_chains(&mut text, &delete_chains);
        text.push_str("COMMIT\n");
        Some(text)
    };
    RulesPlan {
        chains,
        delete_chains,
        fix_jumps,
        restore,
    }
}

fn push_delete_chains(text: &mut String, chains: &[String]) {
    for c in chains {
        let _ = writeln!(text, "-F {c}");
    }
    for c in chains {
        let _ = writeln!(text, "-X {c}");
    }
}

/// The restore text that puts dog's chains back as they were in `old` after `new_doc` was
/// restored (used when the other family's restore failed).
pub fn render_rollback(old: &FilterState, new_doc: &RulesDocument) -> String {
    let new = FilterState::parse(&new_doc.text).owned;
    let mut text = String::from("*filter\n");
    for c in old.owned.keys() {
        let _ = writeln!(text, ":{c} - [0:0]");
    }
    for rules in old.owned.values() {
        for r in rules {
            text.push_str(r);
            text.push('\n');
        }
    }
    for (builtin, target) in HOOKS {
        if !old.owned.contains_key(target) && old.jump(builtin, target) == JumpState::Missing {
            let _ = writeln!(text, "-D {builtin} -j {target}");
        }
    }
    let added: Vec<String> = new
        .keys()
        .filter(|c| !old.owned.contains_key(*c))
        .cloned()
        .collect();
    push_delete_chains(&mut text, &added);
    text.push_str("COMMIT\n");
    text
}

/// The restore text removing every trace of dog from the filter table: jumps into dog's chains
/// (deleted by their full text), then dog's chains flushed and deleted. `None` if none exist.
pub fn render_remove_all(live: &FilterState) -> Option<String> {
    let jumps = live.jumps_into_dog();
    if live.owned.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut text = String::from("*filter\n");
    for j in jumps {
        if let Some(spec) = j.strip_prefix("-A ") {
            let _ = writeln!(text, "-D {spec}");
        }
    }
    let chains: Vec<String> = live.owned.keys().cloned().collect();
    push_delete_chains(&mut text, &chains);
    text.push_str("COMMIT\n");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::ruleset::Family;

    fn doc(text: &str) -> RulesDocument {
        RulesDocument {
            family: Family::V4,
            text: text.to_string(),
        }
    }

    const GOOD: &str = "*filter\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n:DOG-P - [0:0]\n-A DOG-INPUT -j DOG-P\n-A DOG-P -j DROP\n-A DOG-OUTPUT -j ACCEPT\nCOMMIT\n";

    #[test]
    fn validation_accepts_dog_only_documents() {
        assert_eq!(validate_document(&doc(GOOD)), Ok(()));
        for bad in [
            "*filter\n:INPUT ACCEPT [0:0]\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\nCOMMIT\n",
            "*filter\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n-A INPUT -j DOG-INPUT\nCOMMIT\n",
            "*nat\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\nCOMMIT\n",
            "*filter\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n-F INPUT\nCOMMIT\n",
            "*filter\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n-A DOG-INPUT -j DOG-NOPE\nCOMMIT\n",
            "*filter\n:DOG-INPUT - [0:0]\nCOMMIT\n",
            "*filter\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n",
        ] {
            assert!(validate_document(&doc(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_is_empty_when_live_equals_document() {
        let live = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{}-A INPUT -j DOG-INPUT\n-A INPUT -j KUBE-FIREWALL\n-A OUTPUT -j DOG-OUTPUT\nCOMMIT\n",
            GOOD.trim_start_matches("*filter\n").trim_end_matches("COMMIT\n")
        );
        let p = plan_rules(&doc(GOOD), &FilterState::parse(&live));
        assert_eq!(p.restore, None, "{p:?}");
    }

    #[test]
    fn plan_fixes_jumps_deletes_stale_chains_and_diffs() {
        let live = "*filter\n:INPUT ACCEPT [0:0]\n:DOG-INPUT - [0:0]\n:DOG-OLD - [0:0]\n-A INPUT -j KUBE-FIREWALL\n-A INPUT -j DOG-INPUT\n-A DOG-INPUT -j DOG-OLD\n-A DOG-OLD -j ACCEPT\nCOMMIT\n";
        let p = plan_rules(&doc(GOOD), &FilterState::parse(live));
        assert_eq!(p.delete_chains, vec!["DOG-OLD"]);
        assert_eq!(
            p.fix_jumps,
            vec!["INPUT -> DOG-INPUT", "OUTPUT -> DOG-OUTPUT"]
        );
        let r = p.restore.unwrap();
        assert!(r.contains("-D INPUT -j DOG-INPUT\n-I INPUT 1 -j DOG-INPUT\n-I OUTPUT 1 -j DOG-OUTPUT\n-F DOG-OLD\n-X DOG-OLD\nCOMMIT\n"), "{r}");
        let input = p.chains.iter().find(|c| c.chain == "DOG-INPUT").unwrap();
        assert_eq!(input.missing, vec!["-A DOG-INPUT -j DOG-P"]);
        assert_eq!(input.extra, vec!["-A DOG-INPUT -j DOG-OLD"]);
        assert!(p
            .chains
            .iter()
            .any(|c| c.chain == "DOG-OLD" && c.extra_chain));
        assert!(p
            .chains
            .iter()
            .any(|c| c.chain == "DOG-P" && c.missing_chain));
    }

    #[test]
    fn remove_all_deletes_jumps_by_text_and_only_dog_chains() {
        let live = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-X - [0:0]\n:DOG-INPUT - [0:0]\n-A INPUT -j KUBE-X\n-A INPUT -i eth0 -j DOG-INPUT\n-A DOG-INPUT -j ACCEPT\n-A KUBE-X -j RETURN\nCOMMIT\n";
        let r = render_remove_all(&FilterState::parse(live)).unwrap();
        assert_eq!(
            r,
            "*filter\n-D INPUT -i eth0 -j DOG-INPUT\n-F DOG-INPUT\n-X DOG-INPUT\nCOMMIT\n"
        );
        assert_eq!(
            render_remove_all(&FilterState::parse("*filter\nCOMMIT\n")),
            None
        );
    }
}
