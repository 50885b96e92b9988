//! The agent's own form of a [`HostFirewall`]: the same rule documents and failsafe list, with
//! each set held as an `Arc<SetContent>` (packed members plus their hash, computed once). The
//! runtime, the retry state and the kernel's cached live state share the same set contents, so
//! a large set is held once and hashed once per version received.

use crate::core::members::{Members, SetContent};
use dog_protocol::messages::SetDelta;
use dog_protocol::ruleset::{
    rules_hash, sets_hash, Failsafe, Family, FirewallHashes, HostFirewall, RulesDocument,
};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A host firewall as the agent holds it. Serialises exactly like [`HostFirewall`] and is read
/// back from one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "HostFirewall")]
pub struct Firewall {
    pub host: String,
    pub ipv4: RulesDocument,
    pub ipv6: RulesDocument,
    /// Sets referenced by either document, by name.
    #[serde(serialize_with = "serialize_sets")]
    pub sets: BTreeMap<String, Arc<SetContent>>,
    pub failsafe: Failsafe,
}

fn serialize_sets<S: Serializer>(
    sets: &BTreeMap<String, Arc<SetContent>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(sets.iter().map(|(k, v)| (k, &**v)))
}

impl From<HostFirewall> for Firewall {
    /// Packs and hashes each set, dropping its `IpNet` list as soon as it is packed.
    fn from(fw: HostFirewall) -> Self {
        Firewall {
            host: fw.host,
            ipv4: fw.ipv4,
            ipv6: fw.ipv6,
            sets: fw
                .sets
                .into_iter()
                .map(|(name, set)| (name, Arc::new(SetContent::from(set))))
                .collect(),
            failsafe: fw.failsafe,
        }
    }
}

impl From<&HostFirewall> for Firewall {
    fn from(fw: &HostFirewall) -> Self {
        Firewall {
            host: fw.host.clone(),
            ipv4: fw.ipv4.clone(),
            ipv6: fw.ipv6.clone(),
            sets: fw
                .sets
                .iter()
                .map(|(name, set)| {
                    let members = Members::new(set.family, set.members.iter().copied());
                    (name.clone(), Arc::new(SetContent::new(&set.name, members)))
                })
                .collect(),
            failsafe: fw.failsafe.clone(),
        }
    }
}

impl Firewall {
    /// The wire form (sets unpacked to `IpNet` lists).
    pub fn to_host_firewall(&self) -> HostFirewall {
        HostFirewall {
            host: self.host.clone(),
            ipv4: self.ipv4.clone(),
            ipv6: self.ipv6.clone(),
            sets: self
                .sets
                .iter()
                .map(|(n, s)| (n.clone(), s.to_ipset()))
                .collect(),
            failsafe: self.failsafe.clone(),
        }
    }

    /// Equal to [`HostFirewall::hashes`] of the same firewall; set hashes are the cached ones.
    pub fn hashes(&self) -> FirewallHashes {
        FirewallHashes {
            ipv4_rules: rules_hash(&self.ipv4.text),
            ipv6_rules: rules_hash(&self.ipv6.text),
            sets: sets_hash(self.sets.iter().map(|(n, s)| (n.as_str(), s.hash()))),
        }
    }

    pub fn document(&self, family: Family) -> &RulesDocument {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }

    /// Total members over all sets.
    pub fn set_entries(&self) -> usize {
        self.sets.values().map(|s| s.members.len()).sum()
    }

    /// This firewall with `deltas` applied to its sets; the other sets stay shared. Err names
    /// a set the firewall does not have.
    pub fn with_deltas(&self, deltas: &[SetDelta]) -> Result<Firewall, String> {
        let mut next = self.clone();
        for d in deltas {
            let set = next.sets.get(&d.name).ok_or_else(|| d.name.clone())?;
            let changed = crate::core::sets::apply_delta(set, d);
            next.sets.insert(d.name.clone(), Arc::new(changed));
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::ruleset::IpSet;

    fn host_firewall() -> HostFirewall {
        let doc = |family, text: &str| RulesDocument {
            family,
            text: text.into(),
        };
        let set = |name: &str, family, m: &[&str]| {
            IpSet::new(name, family, m.iter().map(|x| x.parse().unwrap()))
        };
        HostFirewall {
            host: "n1".into(),
            ipv4: doc(
                Family::V4,
                "*filter\n:DOG-INPUT - [0:0]\n-A DOG-INPUT -m set --match-set dogz4-a src -j DROP\nCOMMIT\n",
            ),
            ipv6: doc(Family::V6, "*filter\nCOMMIT\n"),
            sets: [
                set("dogz4-a", Family::V4, &["10.0.0.0/8", "1.1.1.1/32"]),
                set("dogz6-a", Family::V6, &["fd00::/64"]),
                set("dogz4-empty", Family::V4, &[]),
            ]
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect(),
            failsafe: Failsafe::default(),
        }
    }

    #[test]
    fn same_hashes_and_wire_form_as_the_host_firewall() {
        let hf = host_firewall();
        let fw = Firewall::from(&hf);
        assert_eq!(fw.hashes(), hf.hashes());
        assert_eq!(Firewall::from(hf.clone()), fw);
        assert_eq!(fw.to_host_firewall(), hf);
        assert_eq!(fw.set_entries(), 3);
        // the state file keeps the HostFirewall format both ways
        let text = serde_json::to_string(&fw).unwrap();
        assert_eq!(
            serde_json::from_str::<HostFirewall>(&text).unwrap(),
            hf.clone()
        );
        assert_eq!(
            serde_json::from_str::<Firewall>(&serde_json::to_string(&hf).unwrap()).unwrap(),
            fw
        );
    }
}
