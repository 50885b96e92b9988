//! Compact storage of a set's members, so a 1,000,000-entry set costs the agent a few MB and
//! its hash is computed once.
//!
//! [`Members`] holds canonical members (host bits cleared, `/0` split, sorted, deduplicated)
//! packed big-endian: 5 bytes per IPv4 member (address, prefix length), 17 per IPv6 member. The
//! byte order of the packed entries is the order of `IpNet`, so merges and comparisons work on
//! the bytes directly. [`SetContent`] is one set with its [`set_hash`] computed at construction;
//! the agent shares it by `Arc` between the firewall it holds and the cached live state.

use dog_protocol::ruleset::{maxelem_for, Family, IpSet, SetHasher};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use std::cmp::Ordering;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

const V4_WIDTH: usize = 5;
const V6_WIDTH: usize = 17;

fn width(family: Family) -> usize {
    match family {
        Family::V4 => V4_WIDTH,
        Family::V6 => V6_WIDTH,
    }
}

/// Canonical members of one family, packed (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Members {
    family: Family,
    bytes: Box<[u8]>,
}

impl fmt::Debug for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Collects members of one family in arrival order, then sorts and packs them. IPv4 members are
/// kept as one `u64` each while collecting (address << 8 | prefix), which sorts like `IpNet`.
#[derive(Debug)]
pub struct MembersBuilder {
    family: Family,
    v4: Vec<u64>,
    v6: Vec<(u128, u8)>,
}

impl MembersBuilder {
    pub fn new(family: Family) -> Self {
        MembersBuilder {
            family,
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }

    /// Adds a member: other-family members are ignored, host bits cleared, `/0` split in two
    /// halves (`hash:net` cannot hold a `/0`), exactly as [`IpSet::new`] does.
    pub fn push(&mut self, net: IpNet) {
        match (self.family, net.trunc()) {
            (Family::V4, IpNet::V4(n)) => {
                if n.prefix_len() == 0 {
                    self.v4.push(1);
                    self.v4.push(u64::from(0x8000_0000u32) << 8 | 1);
                } else {
                    self.v4
                        .push(u64::from(u32::from(n.addr())) << 8 | u64::from(n.prefix_len()));
                }
            }
            (Family::V6, IpNet::V6(n)) => {
                if n.prefix_len() == 0 {
                    self.v6.push((0, 1));
                    self.v6.push((1u128 << 127, 1));
                } else {
                    self.v6.push((u128::from(n.addr()), n.prefix_len()));
                }
            }
            _ => {}
        }
    }

    pub fn finish(mut self) -> Members {
        let bytes: Vec<u8> = match self.family {
            Family::V4 => {
                self.v4.sort_unstable();
                self.v4.dedup();
                let mut out = Vec::with_capacity(self.v4.len() * V4_WIDTH);
                for k in &self.v4 {
                    out.extend_from_slice(&k.to_be_bytes()[3..]);
                }
                out
            }
            Family::V6 => {
                self.v6.sort_unstable();
                self.v6.dedup();
                let mut out = Vec::with_capacity(self.v6.len() * V6_WIDTH);
                for (a, p) in &self.v6 {
                    out.extend_from_slice(&a.to_be_bytes());
                    out.push(*p);
                }
                out
            }
        };
        Members {
            family: self.family,
            bytes: bytes.into_boxed_slice(),
        }
    }
}

fn decode(family: Family, chunk: &[u8]) -> IpNet {
    match family {
        Family::V4 => {
            let addr = Ipv4Addr::new(chunk[0], chunk[1], chunk[2], chunk[3]);
            // Only canonical prefixes (1..=32) are ever packed.
            IpNet::V4(Ipv4Net::new(addr, chunk[4]).unwrap_or_default())
        }
        Family::V6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&chunk[..16]);
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), chunk[16]).unwrap_or_default())
        }
    }
}

impl Members {
    pub fn empty(family: Family) -> Self {
        MembersBuilder::new(family).finish()
    }

    /// Canonicalises arbitrary members of `family` (see [`MembersBuilder::push`]).
    pub fn new(family: Family, members: impl IntoIterator<Item = IpNet>) -> Self {
        let mut b = MembersBuilder::new(family);
        members.into_iter().for_each(|m| b.push(m));
        b.finish()
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / width(self.family)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes held for the members.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len()
    }

    fn chunks(&self) -> std::slice::ChunksExact<'_, u8> {
        self.bytes.chunks_exact(width(self.family))
    }

    /// The members in canonical order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = IpNet> + '_ {
        let family = self.family;
        self.chunks().map(move |c| decode(family, c))
    }

    pub fn to_vec(&self) -> Vec<IpNet> {
        self.iter().collect()
    }

    /// Members of `self` missing from `have`, and members of `have` not in `self` (a merge of
    /// the two sorted packings). Sets of different families share no member.
    pub fn diff(&self, have: &Members) -> (Vec<IpNet>, Vec<IpNet>) {
        self.diff_within(have, usize::MAX).unwrap_or_default()
    }

    /// [`Members::diff`], or `None` as soon as more than `limit` members differ (a replaced
    /// set is not worth listing member by member).
    pub fn diff_within(&self, have: &Members, limit: usize) -> Option<(Vec<IpNet>, Vec<IpNet>)> {
        if self.family != have.family {
            return (self.len() + have.len() <= limit).then(|| (self.to_vec(), have.to_vec()));
        }
        let (mut add, mut del) = (Vec::new(), Vec::new());
        let (mut a, mut b) = (self.chunks().peekable(), have.chunks().peekable());
        loop {
            let ord = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => break,
            };
            match ord {
                Ordering::Equal => {
                    a.next();
                    b.next();
                }
                Ordering::Less => add.extend(a.next().map(|c| decode(self.family, c))),
                Ordering::Greater => del.extend(b.next().map(|c| decode(self.family, c))),
            }
            if add.len() + del.len() > limit {
                return None;
            }
        }
        Some((add, del))
    }
}

/// One of dog's sets: canonical members and their [`set_hash`](dog_protocol::ruleset::set_hash),
/// computed once when the content is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetContent {
    pub name: String,
    pub members: Members,
    hash: String,
}

impl SetContent {
    pub fn new(name: impl Into<String>, members: Members) -> Self {
        let name = name.into();
        let mut h = SetHasher::new(&name, members.family());
        // the packing is the hashed form (`dog_protocol::ruleset::pack_member`)
        h.packed(&members.bytes);
        SetContent {
            hash: h.finish(),
            name,
            members,
        }
    }

    pub fn family(&self) -> Family {
        self.members.family()
    }

    /// The set's content hash, equal to [`IpSet::hash`] of the same set.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn maxelem(&self) -> usize {
        maxelem_for(self.members.len())
    }

    /// The wire form (members as `IpNet`s).
    pub fn to_ipset(&self) -> IpSet {
        IpSet {
            name: self.name.clone(),
            family: self.family(),
            members: self.members.to_vec(),
        }
    }
}

impl From<IpSet> for SetContent {
    fn from(set: IpSet) -> Self {
        let members = Members::new(set.family, set.members);
        SetContent::new(set.name, members)
    }
}

/// Serialises as [`IpSet`] does (`name`, `family`, `members` as strings), member by member.
impl Serialize for SetContent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Seq<'a>(&'a Members);
        impl Serialize for Seq<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter())
            }
        }
        let mut st = s.serialize_struct("IpSet", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("family", &self.family())?;
        st.serialize_field("members", &Seq(&self.members))?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dog_protocol::ruleset::parse_member;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|m| parse_member(m).unwrap()).collect()
    }

    #[test]
    fn packing_is_canonical_like_ipset_new() {
        for (family, raw) in [
            (
                Family::V4,
                nets(&[
                    "10.0.0.5/8",
                    "1.2.3.4",
                    "1.2.3.4/32",
                    "0.0.0.0/0",
                    "::1/128",
                    "1.2.3.0/24",
                    "255.255.255.255",
                ]),
            ),
            (
                Family::V6,
                nets(&[
                    "fd00::1",
                    "::/0",
                    "fd00::/8",
                    "fd00::1/128",
                    "10.0.0.1",
                    "::1",
                ]),
            ),
        ] {
            let set = IpSet::new("dogx", family, raw.clone());
            let content = SetContent::from(IpSet {
                name: "dogx".into(),
                family,
                members: raw,
            });
            assert_eq!(content.members.to_vec(), set.members, "{family}");
            assert_eq!(content.members.len(), set.members.len());
            assert_eq!(content.hash(), set.hash(), "{family}");
            assert_eq!(content.to_ipset(), set);
            assert_eq!(
                serde_json::to_value(&content).unwrap(),
                serde_json::to_value(&set).unwrap()
            );
        }
        assert_eq!(Members::new(Family::V4, nets(&["1.1.1.1"])).heap_bytes(), 5);
    }

    #[test]
    fn diff_is_the_sorted_merge() {
        let want = Members::new(Family::V4, nets(&["1.1.1.1", "2.2.2.0/24", "3.3.3.3"]));
        let have = Members::new(
            Family::V4,
            nets(&["0.0.0.1", "2.2.2.0/24", "3.3.3.3", "9.9.9.9"]),
        );
        let (add, del) = want.diff(&have);
        assert_eq!(add, nets(&["1.1.1.1/32"]));
        assert_eq!(del, nets(&["0.0.0.1/32", "9.9.9.9/32"]));
        assert_eq!(want.diff(&want), (vec![], vec![]));
        assert_eq!(want.diff_within(&have, 2), None);
        assert_eq!(want.diff_within(&have, 3), Some((add, del)));
        // prefix length orders after the address, like IpNet
        let a = Members::new(Family::V4, nets(&["10.0.0.0/8", "10.0.0.0/16"]));
        assert_eq!(a.to_vec(), nets(&["10.0.0.0/8", "10.0.0.0/16"]));
    }
}
