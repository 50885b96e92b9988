//! Offline preview of what one host would run (`dog-operator compile`): its documents, sets,
//! hashes and diagnostics as text or JSON, and a diff between two directories.

use crate::core::compile::{Compiled, Diagnostic, HostOutcome, ObjectKind};
use dog_protocol::ruleset::{member_text, Family};
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt::Write;

/// In text mode, sets longer than this show their first members and a count.
pub const SET_PREVIEW: usize = 20;

/// Diagnostics relevant to `host`: its own, its group's, its profile's and every zone's.
fn relevant<'a>(c: &'a Compiled, host: &str) -> Vec<&'a Diagnostic> {
    let (group, profile) = match c.hosts.get(host) {
        Some(HostOutcome::Firewall { group, profile, .. })
        | Some(HostOutcome::Withheld { group, profile }) => (Some(group), Some(profile)),
        _ => (None, None),
    };
    c.diagnostics
        .iter()
        .filter(|d| match d.kind {
            ObjectKind::Host => d.name == host,
            ObjectKind::Group => Some(&d.name) == group,
            ObjectKind::Profile => Some(&d.name) == profile,
            ObjectKind::Zone => true,
        })
        .collect()
}

fn outcome_line(o: &HostOutcome) -> String {
    match o {
        HostOutcome::Firewall { group, profile, .. } => {
            format!("runs profile {profile} as member of group {group}")
        }
        HostOutcome::Conflict { groups } => format!(
            "CONFLICT: groups with different profiles: {} (keeps its last applied rules)",
            groups.join(", ")
        ),
        HostOutcome::Unmanaged => "unmanaged: in no group with a profile".into(),
        HostOutcome::Withheld { group, profile } => format!(
            "WITHHELD: profile {profile} (group {group}) has errors; keeps its last applied rules"
        ),
    }
}

/// Text rendering of one host's compile result; `None` when the host is unknown.
pub fn host_text(c: &Compiled, host: &str) -> Option<String> {
    let o = c.hosts.get(host)?;
    let mut s = String::new();
    let _ = writeln!(s, "# host {host}: {}", outcome_line(o));
    if let HostOutcome::Firewall { firewall, .. } = o {
        for f in Family::BOTH {
            let doc = firewall.document(f);
            let _ = writeln!(s, "\n# {f} rules (hash {})", doc.hash());
            s.push_str(&doc.text);
        }
        let _ = writeln!(s, "\n# sets (combined hash {})", firewall.hashes.sets);
        for set in firewall.sets.values() {
            let _ = writeln!(
                s,
                "{} {} {} members (hash {})",
                set.name,
                set.family.ipset_family(),
                set.members.len(),
                set.hash()
            );
            for m in set.members.iter().take(SET_PREVIEW) {
                let _ = writeln!(s, "  {}", member_text(m));
            }
            if set.members.len() > SET_PREVIEW {
                let _ = writeln!(s, "  … {} more", set.members.len() - SET_PREVIEW);
            }
        }
    }
    let diags = relevant(c, host);
    let _ = writeln!(s, "\n# diagnostics ({})", diags.len());
    for d in diags {
        let _ = writeln!(
            s,
            "{:?}/{} {}: {}: {}",
            d.kind, d.name, d.field, d.reason, d.message
        );
    }
    Some(s)
}

/// JSON rendering of one host's compile result; `None` when the host is unknown.
pub fn host_json(c: &Compiled, host: &str) -> Option<serde_json::Value> {
    let o = c.hosts.get(host)?;
    let diags: Vec<&Diagnostic> = relevant(c, host);
    let mut v = json!({ "host": host, "outcome": outcome_line(o), "diagnostics": diags });
    if let HostOutcome::Firewall {
        group,
        profile,
        firewall,
    } = o
    {
        v["group"] = json!(group);
        v["profile"] = json!(profile);
        v["hashes"] = json!({
            "ipv4Rules": firewall.hashes.ipv4_rules,
            "ipv6Rules": firewall.hashes.ipv6_rules,
            "sets": firewall.hashes.sets,
        });
        v["ipv4"] = json!(firewall.ipv4.text);
        v["ipv6"] = json!(firewall.ipv6.text);
        v["sets"] = firewall
            .sets
            .values()
            .map(|s| {
                json!({
                    "name": s.name,
                    "family": s.family.ipset_family(),
                    "hash": s.hash(),
                    "members": s.members.iter().map(member_text).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    Some(v)
}

/// Unified-style line diff (`-`/`+`/` ` prefixes) by longest common subsequence.
pub fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("-{}", a[i]));
            i += 1;
        } else {
            out.push(format!("+{}", b[j]));
            j += 1;
        }
    }
    out
}

/// What changes for `host` between two compiles: a one-line summary, then rule lines and set
/// members. Rules are named by identity (`render::rule_id`), so removing one rule shows only
/// its own lines.
pub fn host_diff(old: &Compiled, new: &Compiled, host: &str) -> String {
    let (o, n) = (old.hosts.get(host), new.hosts.get(host));
    let fw = |x: Option<&HostOutcome>| match x {
        Some(HostOutcome::Firewall { firewall, .. }) => Some(firewall.clone()),
        _ => None,
    };
    let (fo, fnew) = (fw(o), fw(n));
    let mut rules = String::new();
    let mut summary = Vec::new();
    for f in Family::BOTH {
        let t = |x: &Option<std::sync::Arc<crate::core::compile::CompiledFirewall>>| {
            x.as_ref()
                .map(|x| x.document(f).text.clone())
                .unwrap_or_default()
        };
        let (a, b) = (t(&fo), t(&fnew));
        let _ = writeln!(rules, "\n--- {f} rules (old)\n+++ {f} rules (new)");
        let changed: Vec<String> = line_diff(&a, &b)
            .into_iter()
            .filter(|l| !l.starts_with(' '))
            .collect();
        if changed.is_empty() {
            let _ = writeln!(rules, "(unchanged)");
        }
        let removed = changed.iter().filter(|l| l.starts_with('-')).count();
        summary.push(format!("{f} rules -{removed} +{}", changed.len() - removed));
        for l in changed {
            let _ = writeln!(rules, "{l}");
        }
    }
    let mut sets = String::from("\n# sets\n");
    let names: BTreeSet<String> = fo
        .iter()
        .chain(fnew.iter())
        .flat_map(|f| f.sets.keys().cloned())
        .collect();
    let (mut added, mut removed, mut touched, mut plus, mut minus) = (0, 0, 0, 0, 0);
    for name in names {
        let so = fo.as_ref().and_then(|f| f.sets.get(&name));
        let sn = fnew.as_ref().and_then(|f| f.sets.get(&name));
        let mo: BTreeSet<_> = so.map(|x| x.members.iter().collect()).unwrap_or_default();
        let mn: BTreeSet<_> = sn.map(|x| x.members.iter().collect()).unwrap_or_default();
        match (so, sn) {
            (Some(_), None) => {
                removed += 1;
                let _ = writeln!(sets, "- set {name} no longer used");
            }
            (None, Some(x)) => {
                added += 1;
                let _ = writeln!(sets, "+ set {name} now used ({} members)", x.members.len());
            }
            _ => {}
        }
        let before = (plus, minus);
        for m in mn.difference(&mo) {
            plus += 1;
            let _ = writeln!(sets, "+ {name} {}", member_text(m));
        }
        for m in mo.difference(&mn) {
            minus += 1;
            let _ = writeln!(sets, "- {name} {}", member_text(m));
        }
        if so.is_some() && sn.is_some() && before != (plus, minus) {
            touched += 1;
        }
    }
    if added + removed + plus + minus == 0 {
        sets.push_str("(unchanged)\n");
    }
    summary.push(format!(
        "sets +{added} -{removed}, members +{plus} -{minus} in {touched} set(s)"
    ));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# host {host}: {}\n# old: {}\n# new: {}",
        summary.join("; "),
        o.map(outcome_line).unwrap_or_else(|| "unknown".into()),
        n.map(outcome_line).unwrap_or_else(|| "unknown".into())
    );
    s + &rules + &sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_added_and_removed_lines() {
        assert_eq!(
            line_diff("a\nb\nc\n", "a\nc\nd\n"),
            vec![" a", "-b", " c", "+d"]
        );
    }
}
