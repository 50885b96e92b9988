//! The failsafe prologue every firewall starts with: what keeps a node reachable whatever its rules say

use super::*;

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
pub(super) fn port_lines(
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
