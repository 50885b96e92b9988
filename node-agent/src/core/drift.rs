//! Drift: how dog's live chains and sets differ from what was applied (pure comparison).

use crate::core::firewall::Firewall;
use crate::core::live::LiveState;
use crate::core::rules::{diff_chains, ChainDiff, FilterState, JumpState, HOOKS};
use dog_protocol::ruleset::{Family, FirewallHashes, PerFamily};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Drift of one family's rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RulesDrift {
    pub family: Option<Family>,
    /// Chains whose lines differ (missing/extra lines, missing/extra chains, order).
    pub chains: Vec<ChainDiff>,
    /// Hook jumps that are not exactly once and first, e.g. `("INPUT", Missing)`.
    pub jumps: Vec<(String, JumpState)>,
}

/// Drift of one of dog's sets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SetDrift {
    pub name: String,
    /// Expected but absent from the kernel.
    pub missing_set: bool,
    /// In the kernel but not expected.
    pub extra_set: bool,
    pub missing_members: Vec<IpNet>,
    pub extra_members: Vec<IpNet>,
}

/// What differs between the applied firewall and the kernel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DriftReport {
    pub expected: FirewallHashes,
    pub live: FirewallHashes,
    /// Serialized as the `ipv4` and `ipv6` fields of the report.
    #[serde(flatten)]
    pub rules: PerFamily<RulesDrift>,
    pub sets: Vec<SetDrift>,
}

impl DriftReport {
    /// No difference at all (hashes equal and hooks in place).
    pub fn is_clean(&self) -> bool {
        self.expected == self.live
            && self
                .rules
                .iter()
                .all(|(_, r)| r.chains.is_empty() && r.jumps.is_empty())
            && self.sets.is_empty()
    }

    /// One line per difference, for logs and reports.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (_, d) in self.rules.iter() {
            let fam = d.family.map(|f| f.to_string()).unwrap_or_default();
            for (hook, st) in &d.jumps {
                out.push(format!("{fam} jump {hook}: {st:?}"));
            }
            for c in &d.chains {
                if c.missing_chain {
                    out.push(format!("{fam} chain {} missing", c.chain));
                }
                if c.extra_chain {
                    out.push(format!("{fam} chain {} not expected", c.chain));
                }
                if c.reordered {
                    out.push(format!("{fam} chain {} reordered", c.chain));
                }
                out.extend(c.missing.iter().map(|l| format!("{fam} missing: {l}")));
                out.extend(c.extra.iter().map(|l| format!("{fam} extra: {l}")));
            }
        }
        for s in &self.sets {
            if s.missing_set {
                out.push(format!("set {} missing", s.name));
            }
            if s.extra_set {
                out.push(format!("set {} not expected", s.name));
            }
            out.extend(
                s.missing_members
                    .iter()
                    .map(|m| format!("set {} missing member {m}", s.name)),
            );
            out.extend(
                s.extra_members
                    .iter()
                    .map(|m| format!("set {} extra member {m}", s.name)),
            );
        }
        out
    }
}

fn rules_drift(family: Family, expected: &Firewall, live: &FilterState) -> RulesDrift {
    let want = FilterState::parse(&expected.document(family).text).owned;
    let jumps = HOOKS
        .iter()
        .filter_map(|(b, t)| match live.jump(b, t) {
            JumpState::First => None,
            other => Some((b.to_string(), other)),
        })
        .collect();
    RulesDrift {
        family: Some(family),
        chains: diff_chains(&want, &live.owned),
        jumps,
    }
}

/// Compares the expected firewall with a snapshot of the kernel (pure).
pub fn compute_drift(expected: &Firewall, live: &LiveState) -> DriftReport {
    let mut sets = Vec::new();
    for (name, want) in &expected.sets {
        match live.sets.get(name) {
            None => sets.push(SetDrift {
                name: name.clone(),
                missing_set: true,
                extra_set: false,
                missing_members: want.members.to_vec(),
                extra_members: Vec::new(),
            }),
            Some(have) if have.content.members == want.members => {}
            Some(have) => {
                let (missing, extra) = want.members.diff(&have.content.members);
                if !missing.is_empty() || !extra.is_empty() || have.family() != want.family() {
                    sets.push(SetDrift {
                        name: name.clone(),
                        missing_set: false,
                        extra_set: false,
                        missing_members: missing,
                        extra_members: extra,
                    });
                }
            }
        }
    }
    // a leftover temporary set (an apply interrupted while filling it) is drift too: the
    // repair's plan destroys it
    for (name, have) in &live.sets {
        if !expected.sets.contains_key(name) {
            sets.push(SetDrift {
                name: name.clone(),
                missing_set: false,
                extra_set: true,
                missing_members: Vec::new(),
                extra_members: have.content.members.to_vec(),
            });
        }
    }
    DriftReport {
        expected: expected.hashes(),
        live: live.hashes(),
        rules: PerFamily::from_fn(|f| rules_drift(f, expected, live.filter(f))),
        sets,
    }
}
