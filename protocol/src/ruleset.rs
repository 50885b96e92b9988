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

mod failsafe;
mod rules;
mod sets;

pub use failsafe::*;
pub use rules::*;
pub use sets::*;

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

/// One `T` per address family: the IPv4/IPv6 pairs (rule documents, plans, drift, a Group's
/// or Zone's two sets) as one value, so code walks both families instead of writing each twice.
/// Serialized as `{"ipv4": …, "ipv6": …}`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerFamily<T> {
    #[serde(rename = "ipv4")]
    pub v4: T,
    #[serde(rename = "ipv6")]
    pub v6: T,
}

impl<T> PerFamily<T> {
    pub fn new(v4: T, v6: T) -> Self {
        PerFamily { v4, v6 }
    }

    /// Builds each family's value from the family.
    pub fn from_fn(mut f: impl FnMut(Family) -> T) -> Self {
        PerFamily {
            v4: f(Family::V4),
            v6: f(Family::V6),
        }
    }

    pub fn get(&self, family: Family) -> &T {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    pub fn get_mut(&mut self, family: Family) -> &mut T {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// Both values with their family, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (Family, &T)> {
        [(Family::V4, &self.v4), (Family::V6, &self.v6)].into_iter()
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerFamily<U> {
        PerFamily {
            v4: f(self.v4),
            v6: f(self.v6),
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
// the host firewall
// ------------------------------------------------------------------------------------------

/// Content hashes of a host firewall, as compared between desired and live state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FirewallHashes {
    pub ipv4_rules: String,
    pub ipv6_rules: String,
    pub sets: String,
}

impl FirewallHashes {
    /// The hash of one family's rule document.
    pub fn rules(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.ipv4_rules,
            Family::V6 => &self.ipv6_rules,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_family_reads_walks_and_serializes_by_family() {
        let mut p = PerFamily::from_fn(|f| f.digit().to_string());
        assert_eq!(p.get(Family::V6), "6");
        p.get_mut(Family::V4).push('!');
        let walked: Vec<(Family, &String)> = p.iter().collect();
        assert_eq!(
            walked,
            [
                (Family::V4, &"4!".to_string()),
                (Family::V6, &"6".to_string())
            ]
        );
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"ipv4":"4!","ipv6":"6"}"#
        );
        assert_eq!(p.map(|s| s.len()), PerFamily::new(2, 1));
    }

    #[test]
    fn the_combined_set_hash_does_not_depend_on_the_order_given() {
        let sorted = sets_hash([("doga4", "h1"), ("dogb4", "h2"), ("dogc4", "h3")].into_iter());
        let shuffled = sets_hash([("dogc4", "h3"), ("doga4", "h1"), ("dogb4", "h2")].into_iter());
        assert_eq!(sorted, shuffled);
        // a name given twice counts once, with its last hash
        let twice = sets_hash(
            [
                ("dogb4", "old"),
                ("doga4", "h1"),
                ("dogc4", "h3"),
                ("dogb4", "h2"),
            ]
            .into_iter(),
        );
        assert_eq!(sorted, twice);
        assert_ne!(
            sorted,
            sets_hash([("doga4", "h1"), ("dogb4", "h2")].into_iter())
        );
    }

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
