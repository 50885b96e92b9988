//! The iptables-restore documents of dog's chains, and the lines of an iptables-save that are dog's

use super::*;

/// An `iptables-restore --noflush` document for the filter table that declares (and so
/// flushes) only dog's chains and appends their rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RulesDocument {
    pub family: Family,
    /// The full restore text: `*filter`, chain declarations, `-A` lines, `COMMIT`.
    pub text: String,
}

impl RulesDocument {
    /// Builds the restore text from per-chain rule lines (each an `-A CHAIN …` line).
    pub fn from_chains(family: Family, chains: &BTreeMap<String, Vec<String>>) -> Self {
        let mut text = String::from("*filter\n");
        for name in chains.keys() {
            text.push(':');
            text.push_str(name);
            text.push_str(" - [0:0]\n");
        }
        for rules in chains.values() {
            for r in rules {
                text.push_str(r);
                text.push('\n');
            }
        }
        text.push_str("COMMIT\n");
        RulesDocument { family, text }
    }

    pub fn hash(&self) -> String {
        rules_hash(&self.text)
    }

    /// Names of the chains this document declares.
    pub fn chains(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with(CHAIN_PREFIX))
            .map(str::to_string)
            .collect()
    }

    /// Set names referenced by `--match-set NAME`.
    pub fn referenced_sets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .text
            .split("--match-set ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next())
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Number of `-A` rule lines.
    pub fn rule_count(&self) -> usize {
        self.text.lines().filter(|l| l.starts_with("-A ")).count()
    }
}

/// One meaningful line of the filter table in an `iptables-save` or restore text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterLine<'a> {
    /// `:NAME POLICY [counters]` — a chain declaration.
    Chain(&'a str),
    /// `-A CHAIN …` — a rule (the whole line, trailing space trimmed).
    Rule { chain: &'a str, line: &'a str },
}

/// The chain declarations and rules of the filter table, in text order; other tables,
/// comments, counters-only lines and table markers are skipped. Both the agent's reading of
/// the kernel and the hashing below go through this one parser.
pub fn filter_lines(save_text: &str) -> impl Iterator<Item = FilterLine<'_>> {
    let mut in_filter = true;
    save_text.lines().filter_map(move |line| {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table.trim() == "filter";
            return None;
        }
        if !in_filter {
            return None;
        }
        if let Some(decl) = line.strip_prefix(':') {
            decl.split_whitespace().next().map(FilterLine::Chain)
        } else if let Some(rest) = line.strip_prefix("-A ") {
            rest.split_whitespace()
                .next()
                .map(|chain| FilterLine::Rule { chain, line })
        } else {
            None
        }
    })
}

/// The canonical lines of dog's chains in an `iptables-save` (or restore) text of the filter
/// table: the declarations of `DOG-…` chains, sorted, then each chain's `-A` lines in order,
/// chains sorted by name. Foreign chains, jump rules in built-in chains, comments, counters
/// and table markers are ignored.
pub fn owned_lines(save_text: &str) -> Vec<String> {
    let mut decls: Vec<String> = Vec::new();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in filter_lines(save_text) {
        match l {
            FilterLine::Chain(name) if name.starts_with(CHAIN_PREFIX) => {
                decls.push(format!(":{name} - [0:0]"));
            }
            FilterLine::Rule { chain, line } if chain.starts_with(CHAIN_PREFIX) => {
                rules
                    .entry(chain.to_string())
                    .or_default()
                    .push(line.to_string());
            }
            _ => {}
        }
    }
    decls.sort();
    decls.dedup();
    decls
        .into_iter()
        .chain(rules.into_values().flatten())
        .collect()
}

/// Hash of dog's chains in a save or restore text (see [`owned_lines`]).
pub fn rules_hash(save_text: &str) -> String {
    let mut h = Sha256::new();
    for l in owned_lines(save_text) {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}
