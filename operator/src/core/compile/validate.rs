//! Checking one rule of a Profile against the schema's intent and the objects it names, before
//! anything is rendered: the result is either every problem of the rule (each naming its
//! field) or a [`ValidRule`] whose parts rendering can use without checking again.

use super::ports::{parse_port, PortRange};
use super::setname::SetSource;
use super::{Diagnostic, ObjectKind, Reason, Severity};
use crate::crd::{Action, PeerKind, Protocol, Rule, RuleType};
use dog_protocol::ruleset::{Family, CHAIN_INPUT, CHAIN_OUTPUT};
use ipnet::IpNet;

/// Longest LOG prefix xt_LOG stores.
pub const LOG_PREFIX_MAX: usize = 29;

/// A rule's direction; also `explain --direction` (`in`, `out`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum Direction {
    /// Traffic to the host (the peer is the source).
    #[serde(rename = "in")]
    #[value(name = "in", alias = "inbound")]
    Inbound,
    /// Traffic from the host (the peer is the destination).
    #[serde(rename = "out")]
    #[value(name = "out", alias = "outbound")]
    Outbound,
}

impl Direction {
    pub(super) fn field(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    pub(super) fn short(self) -> &'static str {
        match self {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        }
    }
    pub(super) fn chain(self) -> &'static str {
        match self {
            Direction::Inbound => CHAIN_INPUT,
            Direction::Outbound => CHAIN_OUTPUT,
        }
    }
}

/// Why a rule cannot use a Group or Zone as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefProblem {
    /// The object does not exist. `remembered`: the compiler still holds its last members
    /// (it existed earlier in this process), which a DROP/REJECT rule keeps blocking.
    Missing { remembered: bool },
    /// The object exists but cannot be used; the profile is withheld.
    Refused { reason: Reason, message: String },
}

/// Whether a Group or Zone can be referenced.
pub type RefCheck<'a> = &'a dyn Fn(SetSource, &str) -> Result<(), RefProblem>;

/// Where a rule sits: what its messages and rendered lines name.
pub(super) struct RuleCtx<'a> {
    pub profile: &'a str,
    pub dir: Direction,
    /// Position in the spec list: only for messages about the spec (`spec.inbound[3]`).
    pub idx: usize,
    /// What the rendered lines call the rule ([`super::render::rule_id`]).
    pub id: &'a str,
    pub audit: bool,
    pub self_group: &'a str,
}

/// What a rule matches as its peer, before families are considered.
pub(super) enum PeerMatch {
    Any,
    Set(SetSource, String),
    /// Truncated to their networks, sorted, without duplicates.
    Cidrs(Vec<IpNet>),
}

/// A rule that passed every check, with the parts rendering needs already parsed.
pub(super) struct ValidRule<'r> {
    pub rule: &'r Rule,
    pub peer: PeerMatch,
    pub ports: Vec<PortRange>,
    /// The families the rule renders in (at least one).
    pub families: Vec<Family>,
    /// The peer is a missing Group/Zone and the rule fails closed by not being rendered.
    pub matches_nothing: bool,
    /// Applies, but not as written.
    pub warnings: Vec<Diagnostic>,
}

/// What a rule does when the Group or Zone it names is missing: it fails closed in the
/// direction of its action (docs/architecture.md, "Missing references").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dangling {
    /// ACCEPT and LOG: the rule is not rendered, so it lets nothing in.
    MatchesNothing,
    /// DROP and REJECT: the rule keeps the peer's last known members.
    KeepsLastMembers,
    /// DROP and REJECT without known members: the whole profile is withheld.
    Withhold,
}

pub fn dangling_effect(action: Action, remembered: bool) -> Dangling {
    match action {
        Action::Accept | Action::Log => Dangling::MatchesNothing,
        Action::Drop | Action::Reject if remembered => Dangling::KeepsLastMembers,
        Action::Drop | Action::Reject => Dangling::Withhold,
    }
}

/// A Linux interface name (at most 15 characters of `[A-Za-z0-9_.-]`), optionally with
/// iptables' `+` wildcard suffix.
pub fn is_interface_name(name: &str) -> bool {
    let body = name.strip_suffix('+').unwrap_or(name);
    !body.is_empty()
        && body.len() <= 15
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Collects a rule's diagnostics, each naming its field under `spec.<dir>[<idx>]`.
struct Checker<'c> {
    profile: &'c str,
    base: String,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn diagnostic(&self, field: &str, reason: Reason, message: String, s: Severity) -> Diagnostic {
        Diagnostic {
            kind: ObjectKind::Profile,
            name: self.profile.to_string(),
            field: if field.is_empty() {
                self.base.clone()
            } else {
                format!("{}.{field}", self.base)
            },
            reason,
            message,
            severity: s,
        }
    }
    fn error(&mut self, field: &str, reason: Reason, message: impl Into<String>) {
        let d = self.diagnostic(field, reason, message.into(), Severity::Error);
        self.errors.push(d);
    }
    fn warn(&mut self, field: &str, reason: Reason, message: impl Into<String>) {
        let d = self.diagnostic(field, reason, message.into(), Severity::Warning);
        self.warnings.push(d);
    }
}

/// Checks `rule` at `ctx`; `refs` answers whether a named Group or Zone can be used.
pub(super) fn validate_rule<'r>(
    ctx: &RuleCtx<'_>,
    rule: &'r Rule,
    refs: RefCheck<'_>,
) -> Result<ValidRule<'r>, Vec<Diagnostic>> {
    let mut c = Checker {
        profile: ctx.profile,
        base: format!("spec.{}[{}]", ctx.dir.field(), ctx.idx),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let (peer, matches_nothing) = check_peer(&mut c, ctx, rule, refs);
    let ports = check_ports(&mut c, rule);
    check_interface(&mut c, rule);
    check_type(&mut c, rule);
    check_log_prefix(&mut c, rule);
    let families = families(rule, &peer);
    if families.is_empty() && c.errors.is_empty() {
        c.error(
            "",
            Reason::NoFamily,
            format!(
                "protocol {:?} and the peer's addresses share no address family; the rule would render to nothing",
                rule.protocol
            ),
        );
    }
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(ValidRule {
        rule,
        peer,
        ports,
        families,
        matches_nothing,
        warnings: c.warnings,
    })
}

/// The peer and whether the rule matches nothing (a missing peer of an ACCEPT/LOG rule).
fn check_peer(
    c: &mut Checker<'_>,
    ctx: &RuleCtx<'_>,
    rule: &Rule,
    refs: RefCheck<'_>,
) -> (PeerMatch, bool) {
    let peer = &rule.peer;
    match peer.kind {
        PeerKind::Any => {
            if !peer.cidrs.is_empty() || peer.name.is_some() {
                c.error(
                    "peer",
                    Reason::InvalidPeer,
                    "peer kind Any takes neither name nor cidrs",
                );
            }
            (PeerMatch::Any, false)
        }
        PeerKind::Group | PeerKind::Zone => {
            let src = if peer.kind == PeerKind::Group {
                SetSource::Group
            } else {
                SetSource::Zone
            };
            match peer.name.as_deref().filter(|n| !n.is_empty()) {
                None => {
                    c.error(
                        "peer.name",
                        Reason::MissingField,
                        format!("peer kind {:?} needs a name", peer.kind),
                    );
                    (PeerMatch::Any, false)
                }
                Some(n) => {
                    let nothing = check_named_peer(c, rule.action, src, n, refs);
                    (PeerMatch::Set(src, n.to_string()), nothing)
                }
            }
        }
        PeerKind::SelfGroup => {
            match refs(SetSource::Group, ctx.self_group) {
                Ok(()) => {}
                Err(RefProblem::Refused { reason, message }) => {
                    c.error("peer.kind", reason, message)
                }
                // the host's own group exists while the host runs it
                Err(RefProblem::Missing { .. }) => c.error(
                    "peer.kind",
                    Reason::DanglingReference,
                    format!("the host's own group `{}` does not exist", ctx.self_group),
                ),
            }
            (
                PeerMatch::Set(SetSource::Group, ctx.self_group.to_string()),
                false,
            )
        }
        PeerKind::Cidrs => (PeerMatch::Cidrs(check_cidrs(c, &peer.cidrs)), false),
    }
}

/// A named Group or Zone peer; true when the rule matches nothing until it exists again.
fn check_named_peer(
    c: &mut Checker<'_>,
    action: Action,
    src: SetSource,
    name: &str,
    refs: RefCheck<'_>,
) -> bool {
    let remembered = match refs(src, name) {
        Ok(()) => return false,
        Err(RefProblem::Refused { reason, message }) => {
            c.error("peer.name", reason, message);
            return false;
        }
        Err(RefProblem::Missing { remembered }) => remembered,
    };
    let what = format!("{src:?} `{name}` does not exist");
    match dangling_effect(action, remembered) {
        Dangling::MatchesNothing => {
            c.warn(
                "peer.name",
                Reason::DanglingReference,
                format!(
                    "{what}; the rule matches nothing until it exists again or the rule is removed"
                ),
            );
            true
        }
        Dangling::KeepsLastMembers => {
            c.warn(
                "peer.name",
                Reason::DanglingReference,
                format!("{what}; the rule keeps blocking its last known members until it exists again or the rule is removed"),
            );
            false
        }
        Dangling::Withhold => {
            c.error(
                "peer.name",
                Reason::DanglingReference,
                format!("{what} and its last members are unknown to this operator; the profile is withheld (its hosts keep their rules) so that removing a blocklist never opens a host"),
            );
            false
        }
    }
}

fn check_cidrs(c: &mut Checker<'_>, cidrs: &[String]) -> Vec<IpNet> {
    if cidrs.is_empty() {
        c.error(
            "peer.cidrs",
            Reason::MissingField,
            "peer kind Cidrs needs at least one CIDR",
        );
    }
    let mut nets = Vec::new();
    for (i, text) in cidrs.iter().enumerate() {
        match super::addresses::parse_entry(text) {
            Ok(n) => {
                if n.trunc() != n {
                    c.warn(
                        &format!("peer.cidrs[{i}]"),
                        Reason::HostBitsSet,
                        format!("`{text}` has host bits set; applied as {}", n.trunc()),
                    );
                }
                nets.push(n.trunc())
            }
            Err(m) => c.error(&format!("peer.cidrs[{i}]"), Reason::InvalidAddress, m),
        }
    }
    nets.sort();
    nets.dedup();
    nets
}

/// Ports and the ICMP type, each against the protocol.
fn check_ports(c: &mut Checker<'_>, rule: &Rule) -> Vec<PortRange> {
    let mut ports = Vec::new();
    for (i, p) in rule.ports.iter().enumerate() {
        match parse_port(p) {
            Ok(r) => ports.push(r),
            Err(m) => c.error(&format!("ports[{i}]"), Reason::InvalidPort, m),
        }
    }
    let port_proto = matches!(
        rule.protocol,
        Protocol::Tcp | Protocol::Udp | Protocol::Sctp
    );
    if !rule.ports.is_empty() && !port_proto {
        c.error(
            "ports",
            Reason::InvalidPort,
            format!(
                "ports need protocol tcp, udp or sctp (protocol is {:?})",
                rule.protocol
            ),
        );
    }
    let icmp_proto = matches!(rule.protocol, Protocol::Icmp | Protocol::Icmpv6);
    if rule.icmp_type.is_some() && !icmp_proto {
        c.error(
            "icmpType",
            Reason::InvalidField,
            "icmpType needs protocol icmp or icmpv6",
        );
    }
    ports
}

fn check_interface(c: &mut Checker<'_>, rule: &Rule) {
    if let Some(ifname) = &rule.interface {
        if !is_interface_name(ifname) {
            c.error(
                "interface",
                Reason::InvalidInterface,
                format!("`{ifname}` is not a Linux interface name"),
            );
        }
    }
}

/// The parameters of `connlimit` and `recent` rules.
fn check_type(c: &mut Checker<'_>, rule: &Rule) {
    match rule.type_ {
        RuleType::Basic => {}
        RuleType::Connlimit => match &rule.connlimit {
            None => c.error(
                "connlimit",
                Reason::MissingField,
                "type connlimit needs connlimit.above",
            ),
            Some(l) => {
                if l.above == 0 {
                    c.error(
                        "connlimit.above",
                        Reason::InvalidField,
                        "connlimit.above must be at least 1",
                    );
                }
                if l.mask_v4.is_some_and(|m| m > 32) {
                    c.error(
                        "connlimit.maskV4",
                        Reason::InvalidField,
                        "maskV4 must be 0..=32",
                    );
                }
                if l.mask_v6.is_some_and(|m| m > 128) {
                    c.error(
                        "connlimit.maskV6",
                        Reason::InvalidField,
                        "maskV6 must be 0..=128",
                    );
                }
            }
        },
        RuleType::Recent => match &rule.recent {
            None => c.error(
                "recent",
                Reason::MissingField,
                "type recent needs recent.seconds and recent.hitCount",
            ),
            Some(r) => {
                if r.seconds == 0 {
                    c.error(
                        "recent.seconds",
                        Reason::InvalidField,
                        "recent.seconds must be at least 1",
                    );
                }
                if !(1..=255).contains(&r.hit_count) {
                    c.error(
                        "recent.hitCount",
                        Reason::InvalidField,
                        "recent.hitCount must be 1..=255",
                    );
                }
            }
        },
    }
}

fn check_log_prefix(c: &mut Checker<'_>, rule: &Rule) {
    if let Some(p) = &rule.log_prefix {
        if p.len() > LOG_PREFIX_MAX || p.chars().any(|ch| matches!(ch, '"' | '\\' | '\'')) {
            c.error(
                "logPrefix",
                Reason::InvalidField,
                format!("log prefix must be at most {LOG_PREFIX_MAX} characters without quotes"),
            );
        }
    }
}

/// The families both the protocol and the peer's addresses allow.
fn families(rule: &Rule, peer: &PeerMatch) -> Vec<Family> {
    Family::BOTH
        .into_iter()
        .filter(|f| match rule.protocol {
            Protocol::Icmp => *f == Family::V4,
            Protocol::Icmpv6 => *f == Family::V6,
            _ => true,
        })
        .filter(|f| match peer {
            PeerMatch::Cidrs(nets) => nets.iter().any(|n| Family::of(n) == *f),
            _ => true,
        })
        .collect()
}
