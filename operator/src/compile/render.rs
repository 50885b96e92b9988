//! Rendering one Profile into the rule lines of dog's chains, per family, exactly as
//! `iptables-save` prints them back.
//!
//! Match order inside a line (what iptables-save prints for rules built in this order):
//! `-A CHAIN [-s|-d CIDR] [-i|-o IF] [-p PROTO] [-m set …] [port/icmp match]
//! [-m conntrack --ctstate …] [-m connlimit …|-m recent …] [-m comment --comment …] -j TARGET`.

use super::ports::{parse_port, port_matches, PortRange};
use super::setname::{set_name, SetSource};
use super::{Diagnostic, ObjectKind, Severity};
use crate::crd::{
    Action, ConntrackState, DefaultAction, PeerKind, PodToHost, Profile, ProfileMode, Protocol,
    Rule, RuleType,
};
use dog_protocol::ruleset::{Failsafe, Family, RulesDocument, CHAIN_INPUT, CHAIN_OUTPUT};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};

/// Longest comment xt_comment stores.
pub const COMMENT_MAX: usize = 255;
/// Longest LOG prefix xt_LOG stores.
pub const LOG_PREFIX_MAX: usize = 29;
/// Prefix of the LOG rules that replace DROP/REJECT in audit mode.
pub const AUDIT_PREFIX: &str = "dog-audit";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn field(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        }
    }
    fn chain(self) -> &'static str {
        match self {
            Direction::Inbound => CHAIN_INPUT,
            Direction::Outbound => CHAIN_OUTPUT,
        }
    }
    /// `-s`/`-i`/`src`/`saddr`/`rsource` for inbound (the peer is the source).
    fn peer_words(self) -> PeerWords {
        match self {
            Direction::Inbound => PeerWords {
                addr: "-s",
                iface: "-i",
                set_dir: "src",
                connlimit: "--connlimit-saddr",
                recent: "--rsource",
            },
            Direction::Outbound => PeerWords {
                addr: "-d",
                iface: "-o",
                set_dir: "dst",
                connlimit: "--connlimit-daddr",
                recent: "--rdest",
            },
        }
    }
}

struct PeerWords {
    addr: &'static str,
    iface: &'static str,
    set_dir: &'static str,
    connlimit: &'static str,
    recent: &'static str,
}

/// Why a rule cannot use a Group or Zone as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefProblem {
    /// The object does not exist. `remembered`: the compiler still holds its last members
    /// (it existed earlier in this process), which a DROP/REJECT rule keeps blocking.
    Missing { remembered: bool },
    /// The object exists but cannot be used (reason, message); the profile is withheld.
    Refused { reason: String, message: String },
}

/// Whether a Group or Zone can be referenced.
pub type RefCheck<'a> = &'a dyn Fn(SetSource, &str) -> Result<(), RefProblem>;

/// One profile rendered for the members of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedProfile {
    pub ipv4: RulesDocument,
    pub ipv6: RulesDocument,
    /// Every set either document references.
    pub sets: BTreeSet<String>,
    /// Set names per referenced Group/Zone (for incremental updates).
    pub sources: BTreeSet<(SetSource, String)>,
    pub inbound_rules: u64,
    pub outbound_rules: u64,
    /// Rules that apply, but not as written (a missing peer failed closed).
    pub warnings: Vec<Diagnostic>,
}

/// How iptables-save prints a string argument: bare when it consists only of
/// `[A-Za-z0-9_-]`, else in double quotes. Quotes and backslashes are removed beforehand (the
/// schema forbids them; this keeps odd input from breaking the line).
pub fn save_string(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '\'') && !c.is_control())
        .collect();
    if !clean.is_empty()
        && clean
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        clean
    } else {
        format!("\"{clean}\"")
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Renders `profile` for members of `self_group`. All problems of the profile are returned
/// together; any problem means no document (the hosts keep their last rules).
pub fn render_profile(
    profile_name: &str,
    profile: &Profile,
    self_group: &str,
    failsafe: &Failsafe,
    refs: RefCheck<'_>,
) -> Result<RenderedProfile, Vec<Diagnostic>> {
    let spec = &profile.spec;
    let audit = spec.mode == ProfileMode::Audit;
    let mut diags = Vec::new();
    let mut chains: [BTreeMap<String, Vec<String>>; 2] = Default::default();
    let mut sources = BTreeSet::new();
    let mut warnings = Vec::new();
    let mut counts = [0u64; 2];
    for (dir, rules, default) in [
        (Direction::Inbound, &spec.inbound, spec.default_inbound),
        (Direction::Outbound, &spec.outbound, spec.default_outbound),
    ] {
        let chain = dir.chain();
        let mut lines: [Vec<String>; 2] = [
            failsafe.prologue(Family::V4, chain),
            failsafe.prologue(Family::V6, chain),
        ];
        if dir == Direction::Inbound {
            let pods = pod_lines(profile_name, spec.pod_to_host, audit, failsafe);
            for l in &mut lines {
                l.extend(pods.iter().cloned());
            }
        }
        for (idx, rule) in rules.iter().enumerate() {
            if !rule.enabled {
                continue;
            }
            let id = rule_id(rule);
            let ctx = RuleCtx {
                profile: profile_name,
                dir,
                idx,
                id: &id,
                audit,
                self_group,
            };
            match render_rule(&ctx, rule, refs) {
                Ok(r) => {
                    for (i, l) in r.lines.into_iter().enumerate() {
                        lines[i].extend(l);
                    }
                    sources.extend(r.sources);
                    warnings.extend(r.warnings);
                    counts[(dir == Direction::Outbound) as usize] += 1;
                }
                Err(d) => diags.extend(d),
            }
        }
        for (i, family) in Family::BOTH.into_iter().enumerate() {
            lines[i].extend(default_lines(profile_name, dir, default, audit, family));
        }
        for (i, l) in lines.into_iter().enumerate() {
            chains[i].insert(chain.to_string(), l);
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let sets = sources
        .iter()
        .flat_map(|(src, name)| Family::BOTH.map(|f| set_name(*src, name, f)))
        .collect();
    let [c4, c6] = chains;
    Ok(RenderedProfile {
        ipv4: RulesDocument::from_chains(Family::V4, &c4),
        ipv6: RulesDocument::from_chains(Family::V6, &c6),
        sets,
        sources,
        inbound_rules: counts[0],
        outbound_rules: counts[1],
        warnings,
    })
}

/// The profile's answer to traffic from the node's own pods (`podToHost`), right after the
/// prologue; nothing without pod interfaces or with `Profile`.
fn pod_lines(profile: &str, choice: PodToHost, audit: bool, failsafe: &Failsafe) -> Vec<String> {
    let comment = format!(
        "-m comment --comment {}",
        save_string(&truncate(&format!("dog:{profile}:pods"), COMMENT_MAX))
    );
    let target = match (choice, audit) {
        (PodToHost::Profile, _) => return Vec::new(),
        (PodToHost::Accept, _) => "ACCEPT".to_string(),
        (PodToHost::Drop, true) => format!(
            "LOG --log-prefix {}",
            save_string(&format!("{AUDIT_PREFIX} pods "))
        ),
        (PodToHost::Drop, false) => "DROP".to_string(),
    };
    failsafe
        .cluster
        .pod_interfaces
        .iter()
        .map(|i| format!("-A {CHAIN_INPUT} -i {i} {comment} -j {target}"))
        .collect()
}

fn default_lines(
    profile: &str,
    dir: Direction,
    action: DefaultAction,
    audit: bool,
    family: Family,
) -> Vec<String> {
    let chain = dir.chain();
    let comment = format!(
        "-m comment --comment {}",
        save_string(&truncate(&format!("dog:{profile}:default"), COMMENT_MAX))
    );
    let target = |t: &str| format!("-A {chain} {comment} -j {t}");
    match (action, audit) {
        (DefaultAction::Accept, _) => vec![target("ACCEPT")],
        (DefaultAction::Drop | DefaultAction::Reject, true) => vec![
            target(&format!(
                "LOG --log-prefix {}",
                save_string(&format!("{AUDIT_PREFIX} default {} ", dir.short()))
            )),
            target("ACCEPT"),
        ],
        (DefaultAction::Drop, false) => vec![target("DROP")],
        (DefaultAction::Reject, false) => vec![target(&reject_target(family))],
    }
}

fn reject_target(family: Family) -> String {
    match family {
        Family::V4 => "REJECT --reject-with icmp-port-unreachable".into(),
        Family::V6 => "REJECT --reject-with icmp6-port-unreachable".into(),
    }
}

struct RuleCtx<'a> {
    profile: &'a str,
    dir: Direction,
    /// Position in the spec list: only for messages about the spec (`spec.inbound[3]`).
    idx: usize,
    /// What the rendered lines call the rule ([`rule_id`]).
    id: &'a str,
    audit: bool,
    self_group: &'a str,
}

/// A rule's identity in the lines it renders to (comment, log prefix, `recent` list): its name,
/// or `#` and 8 hex digits of a hash of its spec when it has none. Not its position, so that
/// removing or inserting a rule changes only that rule's lines (`compile --diff` shows just
/// it, and the other rules' `recent` counters survive).
pub fn rule_id(rule: &crate::crd::Rule) -> String {
    use sha2::{Digest, Sha256};
    match &rule.name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => {
            let spec = serde_json::to_vec(rule).unwrap_or_default();
            format!("#{}", &hex::encode(Sha256::digest(&spec))[..8])
        }
    }
}

struct RenderedRule {
    /// IPv4 lines, IPv6 lines (both empty when the rule matches nothing).
    lines: [Vec<String>; 2],
    sources: Vec<(SetSource, String)>,
    warnings: Vec<Diagnostic>,
}

/// What a rule matches as its peer, before families are considered.
enum PeerMatch {
    Any,
    Set(SetSource, String),
    Cidrs(Vec<IpNet>),
}

fn render_rule(
    ctx: &RuleCtx<'_>,
    rule: &Rule,
    refs: RefCheck<'_>,
) -> Result<RenderedRule, Vec<Diagnostic>> {
    let base = format!("spec.{}[{}]", ctx.dir.field(), ctx.idx);
    let mut diags = Vec::new();
    let mut warnings = Vec::new();
    let mut matches_nothing = false;
    macro_rules! err {
        ($field:expr, $reason:expr, $message:expr $(,)?) => {
            diags.push(Diagnostic {
                kind: ObjectKind::Profile,
                name: ctx.profile.to_string(),
                field: $field,
                reason: ($reason).to_string(),
                message: $message,
                severity: Severity::Error,
            })
        };
    }

    // ---- peer
    let peer = &rule.peer;
    let peer_match = match peer.kind {
        PeerKind::Any => {
            if !peer.cidrs.is_empty() || peer.name.is_some() {
                err!(
                    format!("{base}.peer"),
                    "InvalidPeer",
                    "peer kind Any takes neither name nor cidrs".into(),
                );
            }
            PeerMatch::Any
        }
        PeerKind::Group | PeerKind::Zone => {
            let src = if peer.kind == PeerKind::Group {
                SetSource::Group
            } else {
                SetSource::Zone
            };
            match peer.name.as_deref().filter(|n| !n.is_empty()) {
                None => {
                    err!(
                        format!("{base}.peer.name"),
                        "MissingField",
                        format!("peer kind {:?} needs a name", peer.kind),
                    );
                    PeerMatch::Any
                }
                Some(n) => {
                    match refs(src, n) {
                        Ok(()) => {}
                        Err(RefProblem::Refused { reason, message }) => {
                            err!(format!("{base}.peer.name"), reason, message)
                        }
                        Err(RefProblem::Missing { remembered }) => {
                            let what = format!("{src:?} `{n}` does not exist");
                            match dangling_effect(rule.action, remembered) {
                                Dangling::MatchesNothing => {
                                    matches_nothing = true;
                                    warnings.push(warning(
                                        ctx,
                                        format!("{base}.peer.name"),
                                        "DanglingReference",
                                        format!("{what}; the rule matches nothing until it exists again or the rule is removed"),
                                    ));
                                }
                                Dangling::KeepsLastMembers => warnings.push(warning(
                                    ctx,
                                    format!("{base}.peer.name"),
                                    "DanglingReference",
                                    format!("{what}; the rule keeps blocking its last known members until it exists again or the rule is removed"),
                                )),
                                Dangling::Withhold => err!(
                                    format!("{base}.peer.name"),
                                    "DanglingReference",
                                    format!("{what} and its last members are unknown to this operator; the profile is withheld (its hosts keep their rules) so that removing a blocklist never opens a host"),
                                ),
                            }
                        }
                    }
                    PeerMatch::Set(src, n.to_string())
                }
            }
        }
        PeerKind::SelfGroup => {
            match refs(SetSource::Group, ctx.self_group) {
                Ok(()) => {}
                Err(RefProblem::Refused { reason, message }) => {
                    err!(format!("{base}.peer.kind"), reason, message)
                }
                // the host's own group exists while the host runs it
                Err(RefProblem::Missing { .. }) => err!(
                    format!("{base}.peer.kind"),
                    "DanglingReference",
                    format!("the host's own group `{}` does not exist", ctx.self_group),
                ),
            }
            PeerMatch::Set(SetSource::Group, ctx.self_group.to_string())
        }
        PeerKind::Cidrs => {
            if peer.cidrs.is_empty() {
                err!(
                    format!("{base}.peer.cidrs"),
                    "MissingField",
                    "peer kind Cidrs needs at least one CIDR".into(),
                );
            }
            let mut nets = Vec::new();
            for (i, c) in peer.cidrs.iter().enumerate() {
                match super::addresses::parse_entry(c) {
                    Ok(n) => {
                        if n.trunc() != n {
                            warnings.push(warning(
                                ctx,
                                format!("{base}.peer.cidrs[{i}]"),
                                "HostBitsSet",
                                format!("`{c}` has host bits set; applied as {}", n.trunc()),
                            ));
                        }
                        nets.push(n.trunc())
                    }
                    Err(m) => err!(format!("{base}.peer.cidrs[{i}]"), "InvalidAddress", m),
                }
            }
            nets.sort();
            nets.dedup();
            PeerMatch::Cidrs(nets)
        }
    };

    // ---- protocol, ports, icmp type
    let mut ports: Vec<PortRange> = Vec::new();
    for (i, p) in rule.ports.iter().enumerate() {
        match parse_port(p) {
            Ok(r) => ports.push(r),
            Err(m) => err!(format!("{base}.ports[{i}]"), "InvalidPort", m),
        }
    }
    let port_proto = matches!(
        rule.protocol,
        Protocol::Tcp | Protocol::Udp | Protocol::Sctp
    );
    if !rule.ports.is_empty() && !port_proto {
        err!(
            format!("{base}.ports"),
            "InvalidPort",
            format!(
                "ports need protocol tcp, udp or sctp (protocol is {:?})",
                rule.protocol
            ),
        );
    }
    let icmp_proto = matches!(rule.protocol, Protocol::Icmp | Protocol::Icmpv6);
    if rule.icmp_type.is_some() && !icmp_proto {
        err!(
            format!("{base}.icmpType"),
            "InvalidField",
            "icmpType needs protocol icmp or icmpv6".into(),
        );
    }

    // ---- interface
    if let Some(ifname) = &rule.interface {
        if !is_interface_name(ifname) {
            err!(
                format!("{base}.interface"),
                "InvalidInterface",
                format!("`{ifname}` is not a Linux interface name"),
            );
        }
    }

    // ---- type
    match rule.type_ {
        RuleType::Basic => {}
        RuleType::Connlimit => match &rule.connlimit {
            None => err!(
                format!("{base}.connlimit"),
                "MissingField",
                "type connlimit needs connlimit.above".into(),
            ),
            Some(c) => {
                if c.above == 0 {
                    err!(
                        format!("{base}.connlimit.above"),
                        "InvalidField",
                        "connlimit.above must be at least 1".into(),
                    );
                }
                if c.mask_v4.is_some_and(|m| m > 32) {
                    err!(
                        format!("{base}.connlimit.maskV4"),
                        "InvalidField",
                        "maskV4 must be 0..=32".into(),
                    );
                }
                if c.mask_v6.is_some_and(|m| m > 128) {
                    err!(
                        format!("{base}.connlimit.maskV6"),
                        "InvalidField",
                        "maskV6 must be 0..=128".into(),
                    );
                }
            }
        },
        RuleType::Recent => match &rule.recent {
            None => err!(
                format!("{base}.recent"),
                "MissingField",
                "type recent needs recent.seconds and recent.hitCount".into(),
            ),
            Some(r) => {
                if r.seconds == 0 {
                    err!(
                        format!("{base}.recent.seconds"),
                        "InvalidField",
                        "recent.seconds must be at least 1".into(),
                    );
                }
                if !(1..=255).contains(&r.hit_count) {
                    err!(
                        format!("{base}.recent.hitCount"),
                        "InvalidField",
                        "recent.hitCount must be 1..=255".into(),
                    );
                }
            }
        },
    }
    if let Some(p) = &rule.log_prefix {
        if p.len() > LOG_PREFIX_MAX || p.chars().any(|c| matches!(c, '"' | '\\' | '\'')) {
            err!(
                format!("{base}.logPrefix"),
                "InvalidField",
                format!("log prefix must be at most {LOG_PREFIX_MAX} characters without quotes"),
            );
        }
    }

    // ---- families
    let families: Vec<Family> = Family::BOTH
        .into_iter()
        .filter(|f| match rule.protocol {
            Protocol::Icmp => *f == Family::V4,
            Protocol::Icmpv6 => *f == Family::V6,
            _ => true,
        })
        .filter(|f| match &peer_match {
            PeerMatch::Cidrs(nets) => nets.iter().any(|n| Family::of(n) == *f),
            _ => true,
        })
        .collect();
    if families.is_empty() && diags.is_empty() {
        err!(
            base.clone(),
            "NoFamily",
            format!(
                "protocol {:?} and the peer's addresses share no address family; the rule would render to nothing",
                rule.protocol
            ),
        );
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    if matches_nothing {
        return Ok(RenderedRule {
            lines: Default::default(),
            sources: Vec::new(),
            warnings,
        });
    }

    // ---- assemble
    let words = ctx.dir.peer_words();
    let comment = {
        let mut c = format!("dog:{}:{}:{}", ctx.profile, ctx.dir.short(), ctx.id);
        if let Some(t) = rule.comment.as_deref().filter(|t| !t.is_empty()) {
            c.push(' ');
            c.push_str(t);
        }
        format!(
            "-m comment --comment {}",
            save_string(&truncate(&c, COMMENT_MAX))
        )
    };
    let log_prefix = rule.log_prefix.clone().unwrap_or_else(|| {
        truncate(
            &format!(
                "dog:{}:{}:{} ",
                truncate(ctx.profile, 12),
                ctx.dir.short(),
                ctx.id
            ),
            LOG_PREFIX_MAX,
        )
    });
    let audit_prefix = truncate(
        &format!("{AUDIT_PREFIX} {}:{} ", ctx.dir.short(), ctx.id),
        LOG_PREFIX_MAX,
    );
    // iptables-save prints a recent list's name unquoted: keep it to characters that need none
    let recent_name: String = format!(
        "dog-{}-{}-{}",
        truncate(ctx.profile, 64),
        ctx.dir.short(),
        ctx.id
    )
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    })
    .collect();

    let mut out: [Vec<String>; 2] = Default::default();
    for family in families {
        let addr_variants: Vec<Option<String>> = match &peer_match {
            PeerMatch::Cidrs(nets) => nets
                .iter()
                .filter(|n| Family::of(n) == family)
                .map(|n| {
                    // iptables-save omits a /0 source/destination entirely
                    (n.prefix_len() > 0).then(|| format!("{} {}", words.addr, n))
                })
                .collect(),
            _ => vec![None],
        };
        let set_match = match &peer_match {
            PeerMatch::Set(src, name) => Some(format!(
                "-m set --match-set {} {}",
                set_name(*src, name, family),
                words.set_dir
            )),
            _ => None,
        };
        let proto = match rule.protocol {
            Protocol::Any => None,
            Protocol::Tcp => Some("tcp"),
            Protocol::Udp => Some("udp"),
            Protocol::Sctp => Some("sctp"),
            Protocol::Icmp => Some("icmp"),
            Protocol::Icmpv6 => Some("ipv6-icmp"),
        };
        let proto_matches: Vec<Option<String>> = match rule.protocol {
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp if !ports.is_empty() => {
                port_matches(proto.unwrap_or_default(), &ports)
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            Protocol::Icmp => vec![rule.icmp_type.map(|t| format!("-m icmp --icmp-type {t}"))],
            Protocol::Icmpv6 => vec![rule
                .icmp_type
                .map(|t| format!("-m icmp6 --icmpv6-type {t}"))],
            _ => vec![None],
        };
        let states = if rule.states.is_empty() {
            None
        } else {
            let order = [
                ConntrackState::Invalid,
                ConntrackState::New,
                ConntrackState::Related,
                ConntrackState::Established,
                ConntrackState::Untracked,
            ];
            let names: Vec<&str> = order
                .iter()
                .filter(|s| rule.states.contains(s))
                .map(|s| match s {
                    ConntrackState::Invalid => "INVALID",
                    ConntrackState::New => "NEW",
                    ConntrackState::Related => "RELATED",
                    ConntrackState::Established => "ESTABLISHED",
                    ConntrackState::Untracked => "UNTRACKED",
                })
                .collect();
            Some(format!("-m conntrack --ctstate {}", names.join(",")))
        };
        let recent_mask = match family {
            Family::V4 => "255.255.255.255",
            Family::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        };
        // (type match, whether this line has a target) — recent renders a --set line first.
        let type_lines: Vec<(Option<String>, bool)> = match rule.type_ {
            RuleType::Basic => vec![(None, true)],
            RuleType::Connlimit => {
                let c = rule.connlimit.as_ref();
                let above = c.map(|c| c.above).unwrap_or(1);
                let mask = match family {
                    Family::V4 => c.and_then(|c| c.mask_v4).unwrap_or(32),
                    Family::V6 => c.and_then(|c| c.mask_v6).unwrap_or(128),
                };
                vec![(
                    Some(format!(
                        "-m connlimit --connlimit-above {above} --connlimit-mask {mask} {}",
                        words.connlimit
                    )),
                    true,
                )]
            }
            RuleType::Recent => {
                let (seconds, hits) = rule
                    .recent
                    .as_ref()
                    .map(|r| (r.seconds, r.hit_count))
                    .unwrap_or((1, 1));
                vec![
                    (
                        Some(format!(
                            "-m recent --set --name {} --mask {recent_mask} {}",
                            save_string(&recent_name),
                            words.recent
                        )),
                        false,
                    ),
                    (
                        Some(format!(
                            "-m recent --update --seconds {seconds} --hitcount {hits} --name {} --mask {recent_mask} {}",
                            save_string(&recent_name),
                            words.recent
                        )),
                        true,
                    ),
                ]
            }
        };
        let targets: Vec<String> = {
            let main = match (rule.action, ctx.audit) {
                (Action::Accept, _) => "ACCEPT".to_string(),
                (Action::Drop | Action::Reject, true) => {
                    format!("LOG --log-prefix {}", save_string(&audit_prefix))
                }
                (Action::Drop, false) => "DROP".to_string(),
                (Action::Reject, false) => reject_target(family),
                (Action::Log, _) => format!("LOG --log-prefix {}", save_string(&log_prefix)),
            };
            let audited = ctx.audit && matches!(rule.action, Action::Drop | Action::Reject);
            let mut t = Vec::new();
            if rule.log && rule.action != Action::Log && !audited {
                t.push(format!("LOG --log-prefix {}", save_string(&log_prefix)));
            }
            t.push(main);
            t
        };
        let fam_lines = &mut out[(family == Family::V6) as usize];
        for addr in &addr_variants {
            for pm in &proto_matches {
                let mut prefix: Vec<&str> = vec!["-A", ctx.dir.chain()];
                if let Some(a) = addr {
                    prefix.push(a);
                }
                let iface;
                if let Some(i) = &rule.interface {
                    iface = format!("{} {i}", words.iface);
                    prefix.push(&iface);
                }
                let p;
                if let Some(pr) = proto {
                    p = format!("-p {pr}");
                    prefix.push(&p);
                }
                if let Some(s) = &set_match {
                    prefix.push(s);
                }
                if let Some(m) = pm {
                    prefix.push(m);
                }
                if let Some(s) = &states {
                    prefix.push(s);
                }
                for (type_match, has_target) in &type_lines {
                    let mut parts = prefix.clone();
                    if let Some(t) = type_match {
                        parts.push(t);
                    }
                    parts.push(&comment);
                    let head = parts.join(" ");
                    if *has_target {
                        for t in &targets {
                            fam_lines.push(format!("{head} -j {t}"));
                        }
                    } else {
                        fam_lines.push(head);
                    }
                }
            }
        }
    }
    let sources = match peer_match {
        PeerMatch::Set(src, name) => vec![(src, name)],
        _ => vec![],
    };
    Ok(RenderedRule {
        lines: out,
        sources,
        warnings,
    })
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

fn warning(ctx: &RuleCtx<'_>, field: String, reason: &str, message: String) -> Diagnostic {
    Diagnostic {
        kind: ObjectKind::Profile,
        name: ctx.profile.to_string(),
        field,
        reason: reason.into(),
        message,
        severity: Severity::Warning,
    }
}
