//! "Why is this packet allowed or denied?" — evaluates one new connection against a host's
//! compiled firewall, line by line as the kernel would, and names the rule that decided and
//! the Group or Zone membership that made it match. Pure: it reads only the same compiled
//! output the agent runs.
//!
//! It understands exactly the lines dog renders (`compile::render` and the failsafe prologue);
//! rate-dependent matches (`connlimit`, `recent`) are reported as "may match" and skipped.

pub use crate::core::compile::validate::Direction;
use dog_protocol::ruleset::{Family, HostFirewall, CHAIN_INPUT, CHAIN_OUTPUT};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "ipv6-icmp",
        }
    }
}

/// One new connection (or ICMP message) to explain.
#[derive(Clone, Debug)]
pub struct Query {
    pub direction: Direction,
    pub peer: IpAddr,
    pub protocol: Proto,
    /// Destination port (tcp, udp, sctp) or ICMP type (icmp, icmpv6).
    pub port: Option<u16>,
    /// The interface the packet uses (`-i`/`-o` matches); `None` is an ordinary NIC.
    pub interface: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
}

/// What decided, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    /// The deciding rule line, as `iptables-save` prints it.
    pub rule: String,
    /// What that rule is, from its comment (failsafe, cluster profile, Profile rule, default).
    pub reason: String,
    /// Memberships the rule matched through, e.g. `198.18.0.1 is in Group web`.
    pub via: Vec<String>,
    /// LOG rules the packet passed on the way.
    pub logged: Vec<String>,
    /// Rules whose match depends on rates (connlimit, recent) and were assumed not to match.
    pub may_match: Vec<String>,
}

/// What names in the firewall stand for (the CLI builds it from the snapshot): a set name,
/// e.g. `Group web`, and a rule's comment head `dog:<profile>:<in|out>:<id>`, e.g.
/// `Profile db: inbound rule 1 (pg-cap)` (rules are named by identity, not position).
pub type SetNames = BTreeMap<String, String>;

/// Splits a saved rule line into words, keeping a double-quoted comment as one word.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn iface_matches(pattern: &str, iface: Option<&str>) -> bool {
    let Some(i) = iface else { return false };
    match pattern.strip_suffix('+') {
        Some(prefix) => i.starts_with(prefix),
        None => i == pattern,
    }
}

fn port_in(list: &str, port: Option<u16>) -> bool {
    let Some(p) = port else { return false };
    list.split(',').any(|item| match item.split_once(':') {
        Some((a, b)) => {
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= p && p <= b)
        }
        None => item.parse::<u16>() == Ok(p),
    })
}

/// Explains `q` against `fw`. `names` maps set names to what they stand for.
pub fn explain(fw: &HostFirewall, q: &Query, names: &SetNames) -> Explanation {
    let family = match q.peer {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    };
    let chain = match q.direction {
        Direction::Inbound => CHAIN_INPUT,
        Direction::Outbound => CHAIN_OUTPUT,
    };
    let prefix = format!("-A {chain} ");
    let mut logged = Vec::new();
    let mut may_match = Vec::new();
    for line in fw.document(family).text.lines() {
        if !line.starts_with(&prefix) {
            continue;
        }
        let w = words(line);
        let mut via = Vec::new();
        let mut comment = String::new();
        let mut target: Option<&str> = None;
        let mut rate_dependent = false;
        let mut ok = true;
        let mut i = 2;
        while i < w.len() && ok {
            let arg = |k: usize| w.get(i + k).map(String::as_str).unwrap_or("");
            match w[i].as_str() {
                "-s" | "-d" => {
                    let peer_side = (w[i] == "-s") == (q.direction == Direction::Inbound);
                    ok = peer_side && arg(1).parse::<IpNet>().is_ok_and(|n| n.contains(&q.peer));
                    i += 2;
                }
                "-i" | "-o" => {
                    ok = iface_matches(arg(1), q.interface.as_deref());
                    i += 2;
                }
                "-p" => {
                    ok = arg(1) == q.protocol.name();
                    i += 2;
                }
                "-m" => i += 2,
                "--dport" | "--dports" => {
                    ok = matches!(q.protocol, Proto::Tcp | Proto::Udp | Proto::Sctp)
                        && port_in(arg(1), q.port);
                    i += 2;
                }
                "--icmp-type" | "--icmpv6-type" => {
                    ok = q.port.map(|t| t.to_string()).as_deref() == Some(arg(1));
                    i += 2;
                }
                "--match-set" => {
                    let set = arg(1);
                    let member = fw
                        .sets
                        .get(set)
                        .is_some_and(|s| s.members.iter().any(|m| m.contains(&q.peer)));
                    ok = member;
                    if member {
                        let what = names
                            .get(set)
                            .cloned()
                            .unwrap_or_else(|| format!("set {set}"));
                        via.push(format!("{} is in {what}", q.peer));
                    }
                    i += 3;
                }
                "--ctstate" => {
                    // a new connection is NEW; DNAT only for Service-translated traffic
                    ok = arg(1).split(',').any(|s| s == "NEW");
                    i += 2;
                }
                "--connlimit-above" | "--set" | "--update" => {
                    rate_dependent = true;
                    i += 1;
                }
                "--comment" => {
                    comment = arg(1).to_string();
                    i += 2;
                }
                "-j" => {
                    target = Some(w.get(i + 1).map(String::as_str).unwrap_or(""));
                    i = w.len();
                }
                _ => i += 1,
            }
        }
        if !ok {
            continue;
        }
        if rate_dependent {
            may_match.push(format!("{} ({line})", describe(&comment, names)));
            continue;
        }
        let verdict = match target {
            Some("ACCEPT") => Verdict::Accept,
            Some("DROP") => Verdict::Drop,
            Some("REJECT") => Verdict::Reject,
            Some("LOG") => {
                logged.push(format!("{} ({line})", describe(&comment, names)));
                continue;
            }
            _ => continue,
        };
        return Explanation {
            verdict,
            rule: line.to_string(),
            reason: describe(&comment, names),
            via,
            logged,
            may_match,
        };
    }
    Explanation {
        verdict: Verdict::Accept,
        rule: String::new(),
        reason: "no rule of dog's chain matched: the packet returns to the built-in chain".into(),
        via: Vec::new(),
        logged,
        may_match,
    }
}

/// A rule's comment in words.
fn describe(comment: &str, names: &SetNames) -> String {
    let (head, free) = comment.split_once(' ').unwrap_or((comment, ""));
    let parts: Vec<&str> = head.split(':').collect();
    let text = match parts.as_slice() {
        _ if names.contains_key(head) => names[head].clone(),
        ["dog", "failsafe", what] => format!("failsafe ({what})"),
        ["dog", "cluster", what] => format!("cluster profile ({what})"),
        ["dog", profile, "default"] => format!("Profile {profile}: default action"),
        ["dog", profile, "pods"] => format!("Profile {profile}: podToHost (the node's own pods)"),
        ["dog", profile, dir, id @ ..] => {
            let dir = if *dir == "in" { "inbound" } else { "outbound" };
            format!("Profile {profile}: {dir} rule {}", id.join(":"))
        }
        _ => format!("rule `{comment}`"),
    };
    if free.is_empty() {
        text
    } else {
        format!("{text}: {free}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words(
                "-A DOG-INPUT -p tcp -m comment --comment \"dog:web:in:http public web\" -j ACCEPT"
            ),
            [
                "-A",
                "DOG-INPUT",
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                "dog:web:in:http public web",
                "-j",
                "ACCEPT"
            ]
        );
        let names = SetNames::from([(
            "dog:web:in:http".to_string(),
            "Profile web: inbound rule 1 (http)".to_string(),
        )]);
        assert_eq!(
            describe("dog:web:in:http public web", &names),
            "Profile web: inbound rule 1 (http): public web"
        );
        assert_eq!(
            describe("dog:web:out:#1a2b3c4d", &names),
            "Profile web: outbound rule #1a2b3c4d"
        );
        assert!(port_in("80,8000:8100", Some(8050)) && !port_in("80,8000:8100", Some(81)));
    }
}
