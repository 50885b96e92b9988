//! The compiled firewall of one host, as the operator sends it and the agent applies it.
//!
//! A host's firewall is two `iptables-restore` documents (IPv4, IPv6) that name only dog's own
//! chains, plus the ipsets those documents reference. Every piece carries a content hash computed
//! over its *canonical* text — exactly what `iptables-save` / `ipset save` print back — so the
//! agent can hash the live kernel state with the same functions and compare.
//!
//! Everything here is pure: no kernel, broker or Kubernetes access.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

/// dog's inbound chain, hooked from `INPUT` by one jump.
pub const CHAIN_INPUT: &str = "DOG-INPUT";
/// dog's outbound chain, hooked from `OUTPUT` by one jump.
pub const CHAIN_OUTPUT: &str = "DOG-OUTPUT";
/// Every chain dog owns starts with this prefix; nothing else is ever touched.
pub const CHAIN_PREFIX: &str = "DOG-";
/// Every ipset dog owns starts with this prefix.
pub const SET_PREFIX: &str = "dog";
/// The kernel's limit for an ipset name (IPSET_MAXNAMELEN - 1).
pub const SET_NAME_MAX: usize = 31;
/// Comment prefix of the never-lock-out rules rendered first in dog's chains.
pub const FAILSAFE_COMMENT: &str = "dog:failsafe";
/// Comment prefix of the cluster profile's rules.
pub const CLUSTER_COMMENT: &str = "dog:cluster";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// The `family` word of `ipset create`.
    pub fn ipset_family(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    pub fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

// ------------------------------------------------------------------------------------------
// ipsets
// ------------------------------------------------------------------------------------------

/// One `hash:net` ipset with its members, canonical (host bits cleared, sorted, deduplicated).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub family: Family,
    pub members: Vec<IpNet>,
}

impl IpSet {
    /// Builds a set from arbitrary members of its family: clears host bits, sorts, dedups.
    /// Members of the other family are ignored by the caller's contract; they are filtered here
    /// too so a set can never hold a member the kernel would refuse.
    pub fn new(
        name: impl Into<String>,
        family: Family,
        members: impl IntoIterator<Item = IpNet>,
    ) -> Self {
        let mut members: Vec<IpNet> = members
            .into_iter()
            .filter(|m| Family::of(m) == family)
            .flat_map(split_zero_prefix)
            .map(|m| m.trunc())
            .collect();
        members.sort_unstable();
        members.dedup();
        IpSet {
            name: name.into(),
            family,
            members,
        }
    }

    /// Content hash over name, family and the packed members ([`SetHasher`]).
    pub fn hash(&self) -> String {
        set_hash(&self.name, self.family, self.members.iter())
    }

    /// `maxelem` sized to the content with headroom for small deltas.
    pub fn maxelem(&self) -> usize {
        maxelem_for(self.members.len())
    }
}

/// `hash:net` cannot store a /0; it is stored as the two halves of the address space.
fn split_zero_prefix(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() == 0 {
        net.subnets(1).map(|s| s.collect()).unwrap_or_default()
    } else {
        vec![net]
    }
}

/// `maxelem` for a set of `len` members: at least 65536 (ipset's default), else the next power
/// of two above 1.5 × len so deltas fit without a swap.
pub fn maxelem_for(len: usize) -> usize {
    let want = len + len / 2;
    want.next_power_of_two().max(65536)
}

/// How `ipset save` prints a member: host routes without their prefix length.
pub fn member_text(net: &IpNet) -> String {
    let mut s = String::new();
    write_member(&mut s, net);
    s
}

/// Appends [`member_text`] of `net` to `out` without allocating a string per member.
pub fn write_member(out: &mut String, net: &IpNet) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = if net.prefix_len() == net.max_prefix_len() {
        write!(out, "{}", net.addr())
    } else {
        write!(out, "{net}")
    };
}

/// Hash of a set's content. Members must already be canonical and sorted (as in [`IpSet`] or as
/// parsed back from the kernel by [`parse_ipset_save`]).
pub fn set_hash<'a>(
    name: &str,
    family: Family,
    members: impl Iterator<Item = &'a IpNet>,
) -> String {
    let mut h = SetHasher::new(name, family);
    // packed into a buffer first: one digest update per 64 KiB, not per member
    let mut buf = Vec::with_capacity(1 << 16);
    let mut one = [0u8; 17];
    for m in members {
        buf.extend_from_slice(pack_member(m, &mut one));
        if buf.len() >= (1 << 16) - 17 {
            h.packed(&buf);
            buf.clear();
        }
    }
    h.packed(&buf);
    h.finish()
}

/// [`set_hash`] fed one member at a time, or as packed bytes (the agent's form): SHA-256 over
/// `<name> <family>\n` followed by each member, in canonical order, as its address bytes
/// (network order, 4 or 16) and its prefix length (1 byte). The packed form needs no text
/// formatting, so hashing a 1,000,000-member set costs a few milliseconds, and both sides hash
/// exactly the bytes the agent keeps.
pub struct SetHasher {
    digest: Sha256,
}

impl SetHasher {
    pub fn new(name: &str, family: Family) -> Self {
        let mut digest = Sha256::new();
        digest.update(name.as_bytes());
        digest.update(b" ");
        digest.update(family.ipset_family().as_bytes());
        digest.update(b"\n");
        SetHasher { digest }
    }

    /// The next member, in canonical order.
    pub fn member(&mut self, m: &IpNet) {
        let mut buf = [0u8; 17];
        self.digest.update(pack_member(m, &mut buf));
    }

    /// Members already packed as [`pack_member`] does, concatenated in canonical order.
    pub fn packed(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
    }

    pub fn finish(self) -> String {
        hex::encode(self.digest.finalize())
    }
}

/// A member's packed form, as hashed: address bytes in network order, then the prefix length.
/// Packed members of one family sort (as bytes) exactly like `IpNet`.
pub fn pack_member<'a>(m: &IpNet, buf: &'a mut [u8; 17]) -> &'a [u8] {
    match m {
        IpNet::V4(n) => {
            buf[..4].copy_from_slice(&n.addr().octets());
            buf[4] = n.prefix_len();
            &buf[..5]
        }
        IpNet::V6(n) => {
            buf[..16].copy_from_slice(&n.addr().octets());
            buf[16] = n.prefix_len();
            &buf[..17]
        }
    }
}

/// Combined hash of a host's sets: over `name hash` lines sorted by name.
pub fn sets_hash<'a>(sets: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let sorted: BTreeMap<&str, &str> = sets.collect();
    let mut h = Sha256::new();
    for (name, hash) in sorted {
        h.update(name.as_bytes());
        h.update(b" ");
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// dog's sets as read back from `ipset save` (all sets; only those named `dog…` are returned),
/// canonicalised so [`set_hash`] of the result equals the compiler's hash.
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, IpSet> {
    let mut out: BTreeMap<String, (Family, Vec<IpNet>)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("create") => {
                let Some(name) = words.next() else { continue };
                if !name.starts_with(SET_PREFIX) {
                    continue;
                }
                let rest: Vec<&str> = words.collect();
                let family = match rest.windows(2).find(|w| w[0] == "family").map(|w| w[1]) {
                    Some("inet6") => Family::V6,
                    _ => Family::V4,
                };
                out.insert(name.to_string(), (family, Vec::new()));
            }
            Some("add") => {
                let (Some(name), Some(member)) = (words.next(), words.next()) else {
                    continue;
                };
                if let Some((_, members)) = out.get_mut(name) {
                    if let Some(net) = parse_member(member) {
                        members.push(net);
                    }
                }
            }
            _ => {}
        }
    }
    out.into_iter()
        .map(|(name, (family, members))| {
            let set = IpSet::new(name.clone(), family, members);
            (name, set)
        })
        .collect()
}

/// Parses a member as `ipset` prints it: an address or a CIDR.
pub fn parse_member(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

// ------------------------------------------------------------------------------------------
// rule documents
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// the host firewall
// ------------------------------------------------------------------------------------------

/// Content hashes of a host firewall, as compared between desired and live state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FirewallHashes {
    pub ipv4_rules: String,
    pub ipv6_rules: String,
    pub sets: String,
}

/// Everything one host runs: both rule documents and the sets they reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostFirewall {
    pub host: String,
    pub ipv4: RulesDocument,
    pub ipv6: RulesDocument,
    /// Sets referenced by either document, by name.
    pub sets: BTreeMap<String, IpSet>,
    /// The never-lock-out configuration the prologue was rendered from; the agent re-renders
    /// it and refuses a document whose chains do not start with it.
    pub failsafe: Failsafe,
}

impl HostFirewall {
    pub fn hashes(&self) -> FirewallHashes {
        let set_hashes: Vec<(String, String)> = self
            .sets
            .values()
            .map(|s| (s.name.clone(), s.hash()))
            .collect();
        FirewallHashes {
            ipv4_rules: self.ipv4.hash(),
            ipv6_rules: self.ipv6.hash(),
            sets: sets_hash(set_hashes.iter().map(|(n, h)| (n.as_str(), h.as_str()))),
        }
    }

    pub fn document(&self, family: Family) -> &RulesDocument {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }
}

// ------------------------------------------------------------------------------------------
// failsafe prologue
// ------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum FailsafeProtocol {
    Tcp,
    Udp,
}

impl FailsafeProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            FailsafeProtocol::Tcp => "tcp",
            FailsafeProtocol::Udp => "udp",
        }
    }
}

/// A port or inclusive range that is always accepted, from anywhere or only from (inbound) / to
/// (outbound) one network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FailsafePort {
    pub protocol: FailsafeProtocol,
    pub from: u16,
    pub to: u16,
    /// Only this peer network (`tcp:22@10.0.0.0/8`); rendered in its family's document only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IpNet>,
}

impl FailsafePort {
    pub const fn one(protocol: FailsafeProtocol, port: u16) -> Self {
        FailsafePort {
            protocol,
            from: port,
            to: port,
            net: None,
        }
    }
    pub const fn range(protocol: FailsafeProtocol, from: u16, to: u16) -> Self {
        FailsafePort {
            protocol,
            from,
            to,
            net: None,
        }
    }
    /// The same port, only for `net`.
    pub fn from_net(self, net: IpNet) -> Self {
        FailsafePort {
            net: Some(net.trunc()),
            ..self
        }
    }
    fn in_family(&self, family: Family) -> bool {
        self.net.is_none_or(|n| Family::of(&n) == family)
    }
}

/// What a Kubernetes node needs to stay a working node, accepted right after the failsafe
/// rules and before any Profile rule (docs/architecture.md, "The cluster profile"): the CNI's
/// node-to-node traffic, kube-proxy's health and NodePorts, the agent's own metrics, the
/// host's traffic to its own pods and traffic a Service translated. Empty outside Kubernetes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterNetwork {
    /// Inbound ports (overlay, BGP, Typha, health, NodePorts, metrics).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<FailsafePort>,
    /// Outbound ports (overlay, BGP, Typha).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<FailsafePort>,
    /// Interfaces of the node's own pods (`cni0`, `cali+`, `lxc+`): the host may always reach
    /// its pods (kubelet probes); what pods may send to the host is each Profile's `podToHost`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_interfaces: Vec<String>,
    /// Accept inbound traffic kube-proxy has translated (conntrack state DNAT): a Service's
    /// access is the Service's and NetworkPolicy's business, not the host firewall's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub services: bool,
}

impl ClusterNetwork {
    pub fn is_empty(&self) -> bool {
        *self == ClusterNetwork::default()
    }
}

/// The never-lock-out list, rendered before any profile rule (docs/design.md, Compilation: never lock out).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Failsafe {
    /// Inbound destination ports always accepted.
    pub inbound: Vec<FailsafePort>,
    /// Outbound destination ports always accepted (DNS, DHCP, API server, etcd, the broker).
    pub outbound: Vec<FailsafePort>,
    /// The cluster profile, rendered after the ports above.
    #[serde(default, skip_serializing_if = "ClusterNetwork::is_empty")]
    pub cluster: ClusterNetwork,
}

impl Default for Failsafe {
    fn default() -> Self {
        use FailsafeProtocol::{Tcp, Udp};
        Failsafe {
            inbound: vec![
                FailsafePort::one(Tcp, 22),
                FailsafePort::one(Tcp, 6443),
                FailsafePort::one(Tcp, 10250),
                FailsafePort::range(Tcp, 2379, 2380),
                FailsafePort::one(Udp, 68),
            ],
            outbound: vec![
                FailsafePort::one(Udp, 53),
                FailsafePort::one(Tcp, 53),
                FailsafePort::one(Udp, 67),
                FailsafePort::one(Tcp, 6443),
                FailsafePort::range(Tcp, 2379, 2380),
                FailsafePort::one(Tcp, 5671),
                FailsafePort::one(Tcp, 5672),
            ],
            cluster: ClusterNetwork::default(),
        }
    }
}

impl Failsafe {
    /// The prologue rule lines of `chain` (`DOG-INPUT` or `DOG-OUTPUT`) for `family`, exactly as
    /// `iptables-save` prints them.
    pub fn prologue(&self, family: Family, chain: &str) -> Vec<String> {
        let inbound = chain == CHAIN_INPUT;
        let c =
            |what: &str| format!("-m comment --comment \"{FAILSAFE_COMMENT}:{what}\" -j ACCEPT");
        let mut out = vec![
            format!(
                "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED {}",
                c("established")
            ),
            format!(
                "-A {chain} -{} lo {}",
                if inbound { "i" } else { "o" },
                c("loopback")
            ),
        ];
        let (proto, module, flag, types): (&str, &str, &str, &[u8]) = match family {
            // destination unreachable (incl. fragmentation needed), time exceeded, parameter problem
            Family::V4 => ("icmp", "icmp", "--icmp-type", &[3, 11, 12]),
            // unreachable, packet too big, time exceeded, parameter problem, RS, RA, NS, NA
            Family::V6 => (
                "ipv6-icmp",
                "icmp6",
                "--icmpv6-type",
                &[1, 2, 3, 4, 133, 134, 135, 136],
            ),
        };
        for t in types {
            out.push(format!(
                "-A {chain} -p {proto} -m {module} {flag} {t} {}",
                c("icmp")
            ));
        }
        let (ports, cluster_ports) = if inbound {
            (&self.inbound, &self.cluster.inbound)
        } else {
            (&self.outbound, &self.cluster.outbound)
        };
        let what = if inbound { "inbound" } else { "outbound" };
        port_lines(&mut out, family, chain, inbound, ports, &c(what));
        let cl =
            |what: &str| format!("-m comment --comment \"{CLUSTER_COMMENT}:{what}\" -j ACCEPT");
        port_lines(&mut out, family, chain, inbound, cluster_ports, &cl(what));
        if !inbound {
            for iface in &self.cluster.pod_interfaces {
                out.push(format!("-A {chain} -o {iface} {}", cl("to-pods")));
            }
        } else if self.cluster.services {
            out.push(format!(
                "-A {chain} -m conntrack --ctstate DNAT {}",
                cl("services")
            ));
        }
        out
    }

    /// Whether outbound tcp `port` (the agents' broker connection) is open to every address;
    /// an entry narrowed to a network does not count (the broker's address is not known here).
    pub fn keeps_broker_open(&self, port: u16) -> bool {
        self.outbound.iter().any(|p| {
            p.protocol == FailsafeProtocol::Tcp && p.from <= port && port <= p.to && p.net.is_none()
        })
    }

    /// Checks that `doc` starts each of dog's hooked chains with this failsafe prologue and that
    /// the prologue keeps the given outbound TCP port (the agent's broker connection) open.
    pub fn check(
        &self,
        doc: &RulesDocument,
        broker_port: Option<u16>,
    ) -> Result<(), FailsafeError> {
        if let Some(port) = broker_port {
            if !self.keeps_broker_open(port) {
                return Err(FailsafeError::BrokerBlocked { port });
            }
        }
        let lines = owned_lines(&doc.text);
        for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
            let want = self.prologue(doc.family, chain);
            let prefix = format!("-A {chain} ");
            let have: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with(&prefix))
                .take(want.len())
                .collect();
            for (i, w) in want.iter().enumerate() {
                match have.get(i) {
                    Some(h) if *h == w => {}
                    other => {
                        return Err(FailsafeError::Missing {
                            family: doc.family,
                            chain: chain.to_string(),
                            expected: w.clone(),
                            found: other.map(|s| s.to_string()),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// Appends the accept lines for `ports` (grouped by protocol and peer network, at most 15
/// ports per multiport match, a range counting as two) ending in `tail` (comment and target).
fn port_lines(
    out: &mut Vec<String>,
    family: Family,
    chain: &str,
    inbound: bool,
    ports: &[FailsafePort],
    tail: &str,
) {
    // keyed so that unrestricted entries come first, tcp before udp, as before networks existed
    let mut groups: BTreeMap<(bool, FailsafeProtocol, Option<IpNet>), Vec<&FailsafePort>> =
        BTreeMap::new();
    for p in ports.iter().filter(|p| p.in_family(family)) {
        groups
            .entry((p.net.is_some(), p.protocol, p.net))
            .or_default()
            .push(p);
    }
    for ((_, proto, net), mut list) in groups {
        list.sort();
        list.dedup();
        let mut chunk: Vec<String> = Vec::new();
        let mut weight = 0;
        let mut chunks: Vec<Vec<String>> = Vec::new();
        for p in list {
            let (text, w) = if p.from == p.to {
                (p.from.to_string(), 1)
            } else {
                (format!("{}:{}", p.from, p.to), 2)
            };
            if weight + w > 15 {
                chunks.push(std::mem::take(&mut chunk));
                weight = 0;
            }
            chunk.push(text);
            weight += w;
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
        let p = proto.as_str();
        let peer = match net {
            Some(n) if n.prefix_len() > 0 => format!("{} {n} ", if inbound { "-s" } else { "-d" }),
            _ => String::new(),
        };
        for chunk in chunks {
            if chunk.len() == 1 && !chunk[0].contains(':') {
                out.push(format!(
                    "-A {chain} {peer}-p {p} -m {p} --dport {} {tail}",
                    chunk[0]
                ));
            } else {
                out.push(format!(
                    "-A {chain} {peer}-p {p} -m multiport --dports {} {tail}",
                    chunk.join(",")
                ));
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailsafeError {
    #[error("{family} chain {chain} lacks failsafe rule `{expected}` (found {found:?})")]
    Missing {
        family: Family,
        chain: String,
        expected: String,
        found: Option<String>,
    },
    #[error("the failsafe list does not keep outbound tcp port {port} (the agent's broker connection) open")]
    BrokerBlocked { port: u16 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_canonical_and_split_slash_zero() {
        let s = IpSet::new(
            "dogz4-x",
            Family::V4,
            [
                "10.0.0.5/8",
                "1.2.3.4/32",
                "1.2.3.4",
                "0.0.0.0/0",
                "::1/128",
            ]
            .iter()
            .filter_map(|m| parse_member(m)),
        );
        let text: Vec<String> = s.members.iter().map(member_text).collect();
        assert_eq!(
            text,
            vec!["0.0.0.0/1", "1.2.3.4", "10.0.0.0/8", "128.0.0.0/1"]
        );
    }

    #[test]
    fn set_hasher_equals_the_reference_hash() {
        let s = IpSet::new(
            "dogz6-x",
            Family::V6,
            ["fd00::1", "fd00:1::/64", "2001:db8::/32"]
                .iter()
                .filter_map(|m| parse_member(m)),
        );
        // the hash as specified: "name family" and a newline, then each member's address
        // bytes and prefix length
        let mut reference = format!("{} {}\n", s.name, s.family.ipset_family()).into_bytes();
        for m in &s.members {
            let IpNet::V6(n) = m else { panic!("{m}") };
            reference.extend_from_slice(&n.addr().octets());
            reference.push(n.prefix_len());
        }
        assert_eq!(s.hash(), sha256_hex(&reference));
        let mut h = SetHasher::new(&s.name, s.family);
        s.members.iter().for_each(|m| h.member(m));
        assert_eq!(h.finish(), s.hash());
        assert_eq!(member_text(&s.members[0]), "2001:db8::/32");
        assert_eq!(member_text(&s.members[1]), "fd00::1");
    }

    #[test]
    fn owned_lines_ignore_foreign_chains_and_order_by_chain() {
        let save = "# Generated by iptables-save\n*nat\n:DOG-X - [0:0]\n-A DOG-X -j ACCEPT\nCOMMIT\n*filter\n:INPUT ACCEPT [1:2]\n:DOG-OUTPUT - [0:0]\n:KUBE-SERVICES - [0:0]\n:DOG-INPUT - [0:0]\n-A INPUT -j DOG-INPUT\n-A DOG-OUTPUT -j ACCEPT\n-A KUBE-SERVICES -j RETURN\n-A DOG-INPUT -i lo -j ACCEPT\n-A DOG-INPUT -j DROP\nCOMMIT\n";
        assert_eq!(
            owned_lines(save),
            vec![
                ":DOG-INPUT - [0:0]",
                ":DOG-OUTPUT - [0:0]",
                "-A DOG-INPUT -i lo -j ACCEPT",
                "-A DOG-INPUT -j DROP",
                "-A DOG-OUTPUT -j ACCEPT"
            ]
        );
    }

    #[test]
    fn document_hash_equals_hash_of_equivalent_save_output() {
        let mut chains = BTreeMap::new();
        chains.insert(
            CHAIN_INPUT.to_string(),
            vec!["-A DOG-INPUT -j DROP".to_string()],
        );
        chains.insert(
            CHAIN_OUTPUT.to_string(),
            vec!["-A DOG-OUTPUT -j ACCEPT".to_string()],
        );
        let doc = RulesDocument::from_chains(Family::V4, &chains);
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:DOG-INPUT - [0:0]\n:DOG-OUTPUT - [0:0]\n-A INPUT -j DOG-INPUT\n-A DOG-INPUT -j DROP\n-A DOG-OUTPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(doc.hash(), rules_hash(save));
    }

    #[test]
    fn narrowed_failsafe_ports_and_the_cluster_profile_render_in_their_family() {
        use FailsafeProtocol::{Tcp, Udp};
        let fs = Failsafe {
            inbound: vec![
                FailsafePort::one(Tcp, 22).from_net("10.20.0.0/16".parse().unwrap()),
                FailsafePort::one(Tcp, 22).from_net("fd00:20::/48".parse().unwrap()),
                FailsafePort::one(Tcp, 10250),
            ],
            outbound: vec![FailsafePort::one(Tcp, 5672)],
            cluster: ClusterNetwork {
                inbound: vec![FailsafePort::one(Udp, 8472), FailsafePort::one(Tcp, 10291)],
                outbound: vec![FailsafePort::one(Udp, 8472)],
                pod_interfaces: vec!["cni0".into()],
                services: true,
            },
        };
        let v4 = fs.prologue(Family::V4, CHAIN_INPUT);
        let tail: Vec<&str> = v4.iter().skip(5).map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "-A DOG-INPUT -p tcp -m tcp --dport 10250 -m comment --comment \"dog:failsafe:inbound\" -j ACCEPT",
                "-A DOG-INPUT -s 10.20.0.0/16 -p tcp -m tcp --dport 22 -m comment --comment \"dog:failsafe:inbound\" -j ACCEPT",
                "-A DOG-INPUT -p tcp -m tcp --dport 10291 -m comment --comment \"dog:cluster:inbound\" -j ACCEPT",
                "-A DOG-INPUT -p udp -m udp --dport 8472 -m comment --comment \"dog:cluster:inbound\" -j ACCEPT",
                "-A DOG-INPUT -m conntrack --ctstate DNAT -m comment --comment \"dog:cluster:services\" -j ACCEPT",
            ]
        );
        let v6 = fs.prologue(Family::V6, CHAIN_INPUT).join("\n");
        assert!(
            v6.contains("-s fd00:20::/48 -p tcp -m tcp --dport 22"),
            "{v6}"
        );
        assert!(!v6.contains("10.20.0.0"), "{v6}");
        let out = fs.prologue(Family::V4, CHAIN_OUTPUT);
        assert_eq!(
            out.last().map(String::as_str),
            Some("-A DOG-OUTPUT -o cni0 -m comment --comment \"dog:cluster:to-pods\" -j ACCEPT")
        );
        // an old firewall (no cluster section) reads and renders as before
        let old: Failsafe = serde_json::from_str(
            r#"{"inbound":[{"protocol":"tcp","from":22,"to":22}],"outbound":[]}"#,
        )
        .unwrap();
        assert!(old.cluster.is_empty());
        assert_eq!(old.prologue(Family::V4, CHAIN_INPUT).len(), 6);
        // the broker port counts only when open to every address
        let narrow = Failsafe {
            outbound: vec![FailsafePort::one(Tcp, 5672).from_net("10.0.0.0/8".parse().unwrap())],
            ..Failsafe::default()
        };
        let doc = RulesDocument::from_chains(Family::V4, &BTreeMap::new());
        assert_eq!(
            narrow.check(&doc, Some(5672)),
            Err(FailsafeError::BrokerBlocked { port: 5672 })
        );
    }

    #[test]
    fn failsafe_check_accepts_own_prologue_and_refuses_a_missing_rule() {
        let fs = Failsafe::default();
        let mut chains = BTreeMap::new();
        let mut input = fs.prologue(Family::V4, CHAIN_INPUT);
        input.push("-A DOG-INPUT -j DROP".into());
        chains.insert(CHAIN_INPUT.to_string(), input.clone());
        chains.insert(
            CHAIN_OUTPUT.to_string(),
            fs.prologue(Family::V4, CHAIN_OUTPUT),
        );
        let doc = RulesDocument::from_chains(Family::V4, &chains);
        assert_eq!(fs.check(&doc, Some(5672)), Ok(()));
        assert!(matches!(
            fs.check(&doc, Some(5999)),
            Err(FailsafeError::BrokerBlocked { port: 5999 })
        ));
        input.remove(1);
        chains.insert(CHAIN_INPUT.to_string(), input);
        let doc = RulesDocument::from_chains(Family::V4, &chains);
        assert!(matches!(
            fs.check(&doc, None),
            Err(FailsafeError::Missing { .. })
        ));
    }
}
