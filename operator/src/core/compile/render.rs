//! Rendering one Profile into the rule lines of dog's chains, per family, exactly as
//! `iptables-save` prints them back.
//!
//! Match order inside a line (what iptables-save prints for rules built in this order):
//! `-A CHAIN [-s|-d CIDR] [-i|-o IF] [-p PROTO] [-m set …] [port/icmp match]
//! [-m conntrack --ctstate …] [-m connlimit …|-m recent …] [-m comment --comment …] -j TARGET`.

use super::ports::{port_matches, PortRange};
use super::setname::{set_name, SetSource};
use super::validate::{
    validate_rule, Direction, PeerMatch, RefCheck, RuleCtx, ValidRule, LOG_PREFIX_MAX,
};
use super::Diagnostic;
use crate::crd::{
    Action, ConntrackState, DefaultAction, PodToHost, Profile, ProfileMode, Protocol, Rule,
    RuleType,
};
use dog_protocol::ruleset::{Failsafe, Family, RulesDocument, CHAIN_INPUT};
use std::collections::{BTreeMap, BTreeSet};

/// Longest comment xt_comment stores.
pub const COMMENT_MAX: usize = 255;
/// Prefix of the LOG rules that replace DROP/REJECT in audit mode.
pub const AUDIT_PREFIX: &str = "dog-audit";
/// The words of a line that name the peer, by direction: the peer is the source of inbound
/// traffic and the destination of outbound.
struct PeerWords {
    addr: &'static str,
    iface: &'static str,
    set_dir: &'static str,
    connlimit: &'static str,
    recent: &'static str,
}

fn peer_words(dir: Direction) -> PeerWords {
    match dir {
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
            match validate_rule(&ctx, rule, refs) {
                Ok(valid) => {
                    let r = render_rule(&ctx, valid);
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

/// Renders a checked rule in each of its families.
fn render_rule(ctx: &RuleCtx<'_>, valid: ValidRule<'_>) -> RenderedRule {
    if valid.matches_nothing {
        return RenderedRule {
            lines: Default::default(),
            sources: Vec::new(),
            warnings: valid.warnings,
        };
    }
    let names = rule_names(ctx, valid.rule);
    let mut lines: [Vec<String>; 2] = Default::default();
    for &family in &valid.families {
        lines[(family == Family::V6) as usize] = family_lines(ctx, &valid, &names, family);
    }
    let sources = match valid.peer {
        PeerMatch::Set(src, name) => vec![(src, name)],
        _ => vec![],
    };
    RenderedRule {
        lines,
        sources,
        warnings: valid.warnings,
    }
}

/// What a rule's lines call it: the comment, its LOG prefixes and its `recent` list.
struct RuleNames {
    comment: String,
    log_prefix: String,
    audit_prefix: String,
    recent_list: String,
}

fn rule_names(ctx: &RuleCtx<'_>, rule: &Rule) -> RuleNames {
    let dir = ctx.dir.short();
    let comment = {
        let mut c = format!("dog:{}:{dir}:{}", ctx.profile, ctx.id);
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
            &format!("dog:{}:{dir}:{} ", truncate(ctx.profile, 12), ctx.id),
            LOG_PREFIX_MAX,
        )
    });
    let audit_prefix = truncate(&format!("{AUDIT_PREFIX} {dir}:{} ", ctx.id), LOG_PREFIX_MAX);
    // iptables-save prints a recent list's name unquoted: keep it to characters that need none
    let recent_list = format!("dog-{}-{dir}-{}", truncate(ctx.profile, 64), ctx.id)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    RuleNames {
        comment,
        log_prefix,
        audit_prefix,
        recent_list,
    }
}

/// One family's lines of a rule: one per address × port match × type line × target, with
/// the matches in the order iptables-save prints them (see the module doc).
fn family_lines(
    ctx: &RuleCtx<'_>,
    valid: &ValidRule<'_>,
    names: &RuleNames,
    family: Family,
) -> Vec<String> {
    let rule = valid.rule;
    let words = peer_words(ctx.dir);
    let addrs = address_matches(&valid.peer, family, words.addr);
    let iface = rule
        .interface
        .as_ref()
        .map(|i| format!("{} {i}", words.iface));
    let proto = protocol_name(rule.protocol);
    let proto_word = proto.map(|p| format!("-p {p}"));
    let set = match &valid.peer {
        PeerMatch::Set(src, name) => Some(format!(
            "-m set --match-set {} {}",
            set_name(*src, name, family),
            words.set_dir
        )),
        _ => None,
    };
    let proto_matches = protocol_matches(rule, proto, &valid.ports);
    let states = conntrack_match(&rule.states);
    let types = type_matches(rule, family, &words, &names.recent_list);
    let targets = targets(ctx, rule, family, names);
    let mut out = Vec::new();
    for addr in &addrs {
        for pm in &proto_matches {
            let prefix: Vec<&str> = ["-A", ctx.dir.chain()]
                .into_iter()
                .chain(addr.as_deref())
                .chain(iface.as_deref())
                .chain(proto_word.as_deref())
                .chain(set.as_deref())
                .chain(pm.as_deref())
                .chain(states.as_deref())
                .collect();
            for (type_match, has_target) in &types {
                let mut parts = prefix.clone();
                parts.extend(type_match.as_deref());
                parts.push(&names.comment);
                let head = parts.join(" ");
                if *has_target {
                    out.extend(targets.iter().map(|t| format!("{head} -j {t}")));
                } else {
                    out.push(head);
                }
            }
        }
    }
    out
}

/// One address match per CIDR of the family (none for a /0, which iptables-save omits), or a
/// single empty one when the peer is not a CIDR list.
fn address_matches(peer: &PeerMatch, family: Family, word: &str) -> Vec<Option<String>> {
    match peer {
        PeerMatch::Cidrs(nets) => nets
            .iter()
            .filter(|n| Family::of(n) == family)
            .map(|n| (n.prefix_len() > 0).then(|| format!("{word} {n}")))
            .collect(),
        _ => vec![None],
    }
}

fn protocol_name(protocol: Protocol) -> Option<&'static str> {
    match protocol {
        Protocol::Any => None,
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
        Protocol::Sctp => Some("sctp"),
        Protocol::Icmp => Some("icmp"),
        Protocol::Icmpv6 => Some("ipv6-icmp"),
    }
}

/// The port or ICMP-type matches: one line each (at least one, maybe empty).
fn protocol_matches(rule: &Rule, proto: Option<&str>, ports: &[PortRange]) -> Vec<Option<String>> {
    match rule.protocol {
        Protocol::Tcp | Protocol::Udp | Protocol::Sctp if !ports.is_empty() => {
            port_matches(proto.unwrap_or_default(), ports)
                .into_iter()
                .map(Some)
                .collect()
        }
        Protocol::Icmp => vec![rule.icmp_type.map(|t| format!("-m icmp --icmp-type {t}"))],
        Protocol::Icmpv6 => vec![rule
            .icmp_type
            .map(|t| format!("-m icmp6 --icmpv6-type {t}"))],
        _ => vec![None],
    }
}

/// `--ctstate` in the order iptables-save prints the states.
fn conntrack_match(states: &[ConntrackState]) -> Option<String> {
    if states.is_empty() {
        return None;
    }
    let order = [
        (ConntrackState::Invalid, "INVALID"),
        (ConntrackState::New, "NEW"),
        (ConntrackState::Related, "RELATED"),
        (ConntrackState::Established, "ESTABLISHED"),
        (ConntrackState::Untracked, "UNTRACKED"),
    ];
    let names: Vec<&str> = order
        .iter()
        .filter(|(s, _)| states.contains(s))
        .map(|(_, n)| *n)
        .collect();
    Some(format!("-m conntrack --ctstate {}", names.join(",")))
}

/// (type match, whether the line has a target): a `recent` rule renders a `--set` line first.
fn type_matches(
    rule: &Rule,
    family: Family,
    words: &PeerWords,
    recent_list: &str,
) -> Vec<(Option<String>, bool)> {
    match rule.type_ {
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
            let mask = match family {
                Family::V4 => "255.255.255.255",
                Family::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            };
            let list = save_string(recent_list);
            vec![
                (
                    Some(format!(
                        "-m recent --set --name {list} --mask {mask} {}",
                        words.recent
                    )),
                    false,
                ),
                (
                    Some(format!(
                        "-m recent --update --seconds {seconds} --hitcount {hits} --name {list} --mask {mask} {}",
                        words.recent
                    )),
                    true,
                ),
            ]
        }
    }
}

/// The rule's targets: its action (a LOG in audit mode for DROP/REJECT), preceded by a LOG
/// when the rule asks to log.
fn targets(ctx: &RuleCtx<'_>, rule: &Rule, family: Family, names: &RuleNames) -> Vec<String> {
    let log = || format!("LOG --log-prefix {}", save_string(&names.log_prefix));
    let audited = ctx.audit && matches!(rule.action, Action::Drop | Action::Reject);
    let main = match rule.action {
        Action::Accept => "ACCEPT".to_string(),
        Action::Drop | Action::Reject if audited => {
            format!("LOG --log-prefix {}", save_string(&names.audit_prefix))
        }
        Action::Drop => "DROP".to_string(),
        Action::Reject => reject_target(family),
        Action::Log => log(),
    };
    let mut t = Vec::new();
    if rule.log && rule.action != Action::Log && !audited {
        t.push(log());
    }
    t.push(main);
    t
}
